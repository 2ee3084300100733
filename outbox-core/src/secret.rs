//! [`read_secret_file`]: secrets (passwords, tokens, keys) read from files, the `*_FILE`
//! convention of container platforms, with a warning when others may read them.

use std::io;
use std::path::Path;

/// Reads the secret in the file at `path`, without its trailing line break (`\n` or `\r\n`,
/// as an editor or `echo` leaves it), so the file can hold a password, a token or an nkey seed
/// as written.
///
/// On Unix, a file whose mode lets its group or others read or write it (wider than `0600`)
/// is read anyway but logged as a warning naming the path and the mode: a secret should be
/// readable by its owner only. The secret itself is never logged.
///
/// ```
/// # fn main() -> std::io::Result<()> {
/// let path = std::env::temp_dir().join(format!("waybill-doc-secret-{}", std::process::id()));
/// std::fs::write(&path, "s3cret\n")?;
/// assert_eq!(waybill_outbox_core::read_secret_file(&path)?, "s3cret");
/// # std::fs::remove_file(&path)?;
/// # Ok(())
/// # }
/// ```
///
/// # Errors
///
/// The [`io::Error`] of opening or reading the file (missing, not readable, not UTF-8). Its
/// message names the cause, never the content.
pub fn read_secret_file(path: impl AsRef<Path>) -> io::Result<String> {
    let path = path.as_ref();
    warn_if_shared(path);
    let mut secret = std::fs::read_to_string(path)?;
    if secret.ends_with('\n') {
        secret.pop();
        if secret.ends_with('\r') {
            secret.pop();
        }
    }
    Ok(secret)
}

/// Logs a warning when the file at `path` may be read or written by its group or others.
/// Nothing on non-Unix systems, or when the file cannot be inspected (reading it reports that).
/// For secrets a client library reads by path itself (a TLS client key).
///
/// ```
/// waybill_outbox_core::warn_if_shared("/etc/hostname"); // mode 0644: logs a warning
/// ```
pub fn warn_if_shared(path: impl AsRef<Path>) {
    let path = path.as_ref();
    if let Some(mode) = shared_mode(path) {
        log::warn!(
            "secret file {} has mode {mode:04o}: group or others may access it; `chmod 600` it",
            path.display()
        );
    }
}

/// The permission bits of `path` when they are wider than owner-only.
#[cfg(unix)]
fn shared_mode(path: &Path) -> Option<u32> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path).ok()?.permissions().mode() & 0o7777;
    (mode & 0o077 != 0).then_some(mode)
}

#[cfg(not(unix))]
fn shared_mode(_path: &Path) -> Option<u32> {
    None
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn temp(name: &str, content: &str) -> std::path::PathBuf {
        let path = std::env::temp_dir().join(format!(
            "waybill-secret-{name}-{}-{}",
            std::process::id(),
            uuid::Uuid::new_v4()
        ));
        std::fs::write(&path, content).unwrap();
        path
    }

    #[test]
    fn one_trailing_line_break_is_dropped_and_nothing_else() {
        for (content, secret) in [
            ("pw\n", "pw"),
            ("pw\r\n", "pw"),
            ("pw", "pw"),
            ("pw\n\n", "pw\n"),
            (" pw ", " pw "),
        ] {
            let path = temp("trim", content);
            assert_eq!(read_secret_file(&path).unwrap(), secret, "{content:?}");
            std::fs::remove_file(path).unwrap();
        }
    }

    #[cfg(unix)]
    #[test]
    fn modes_wider_than_owner_only_are_reported() {
        use std::os::unix::fs::PermissionsExt;
        let path = temp("mode", "pw");
        for (mode, shared) in [
            (0o600, None),
            (0o400, None),
            (0o640, Some(0o640)),
            (0o604, Some(0o604)),
        ] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            assert_eq!(shared_mode(&path), shared, "{mode:o}");
        }
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn a_missing_file_is_an_error_naming_the_cause() {
        let error = read_secret_file("/nonexistent/waybill/secret").unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::NotFound);
    }
}
