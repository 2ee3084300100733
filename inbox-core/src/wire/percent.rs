//! The HTTP binding's percent-encoding of binary-mode header values (CloudEvents HTTP protocol
//! binding 3.1.3.2), which the NATS binding and the memory transport follow.

use std::borrow::Cow;

/// Whether `byte` is sent as it is: printable ASCII (U+0021 to U+007E) except `"` and `%`.
fn plain(byte: u8) -> bool {
    (0x21..=0x7e).contains(&byte) && byte != b'"' && byte != b'%'
}

/// `value` with every byte of its UTF-8 form that is not [`plain`] (space, `"`, `%`, controls
/// and anything beyond ASCII) written as `%XX`. Borrows when nothing needs escaping, which is
/// the common case.
pub(crate) fn escape(value: &str) -> Cow<'_, str> {
    if value.bytes().all(plain) {
        return Cow::Borrowed(value);
    }
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let mut out = String::with_capacity(value.len() + 8);
    for byte in value.bytes() {
        if plain(byte) {
            out.push(char::from(byte));
        } else {
            out.push('%');
            out.push(char::from(HEX[usize::from(byte >> 4)]));
            out.push(char::from(HEX[usize::from(byte & 0x0f)]));
        }
    }
    Cow::Owned(out)
}

/// `value` with every `%XX` decoded, or `None` when a `%` is not followed by two hex digits or
/// the decoded bytes are not UTF-8. Borrows when there is nothing to decode.
pub(crate) fn unescape(value: &str) -> Option<Cow<'_, str>> {
    if !value.contains('%') {
        return Some(Cow::Borrowed(value));
    }
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hi = hex(*bytes.get(i + 1)?)?;
            let lo = hex(*bytes.get(i + 2)?)?;
            out.push(hi << 4 | lo);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok().map(Cow::Owned)
}

fn hex(digit: u8) -> Option<u8> {
    match digit {
        b'0'..=b'9' => Some(digit - b'0'),
        b'a'..=b'f' => Some(digit - b'a' + 10),
        b'A'..=b'F' => Some(digit - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn only_space_quote_percent_and_non_printable_ascii_are_escaped() {
        assert!(matches!(escape("2026-12-06T01:00:00Z"), Cow::Borrowed(_)));
        assert_eq!(escape("a b\"c%d"), "a%20b%22c%25d");
        assert_eq!(escape("€\n"), "%E2%82%AC%0A");
    }

    #[test]
    fn unescape_reads_any_case_and_refuses_broken_sequences() {
        assert_eq!(unescape("%e2%82%ac%3A").as_deref(), Some("€:"));
        assert_eq!(unescape("%2").as_deref(), None);
        assert_eq!(unescape("%zz").as_deref(), None);
        assert_eq!(unescape("%FF").as_deref(), None);
    }

    proptest! {
        #[test]
        fn unescape_inverts_escape(value in any::<String>()) {
            let escaped = escape(&value);
            prop_assert!(escaped.bytes().all(|b| (0x21..=0x7e).contains(&b) && b != b'"'));
            let back = unescape(&escaped);
            prop_assert_eq!(back.as_deref(), Some(value.as_str()));
        }

        #[test]
        fn unescape_never_panics(value in "\\PC{0,20}%?[0-9a-fA-F]?") {
            let _ = unescape(&value);
        }
    }
}
