//! [`redact_url`]: connection URLs fit for logs and error messages; [`url_userinfo`]: the
//! credentials in them, for clients that ignore a URL's user info.

/// `url` with its credentials replaced by `***`, for logs and error messages: the password of
/// each URL's user info, and a lone token (`nats://token@host`; a lone user name of the other
/// schemes is kept). Comma-separated lists of URLs, as NATS takes them, are redacted one by one.
/// An `@` after the authority (in the path or query) is not user info.
///
/// ```
/// use waybill_outbox_core::redact_url;
///
/// assert_eq!(redact_url("postgres://app:s3cret@db:5432/orders"), "postgres://app:***@db:5432/orders");
/// assert_eq!(redact_url("amqp://guest@rabbit/%2f"), "amqp://guest@rabbit/%2f");
/// assert_eq!(redact_url("nats://token@h1:4222,nats://a:b@h2"), "nats://***@h1:4222,nats://a:***@h2");
/// assert_eq!(redact_url("/var/lib/app.db"), "/var/lib/app.db");
/// ```
pub fn redact_url(url: &str) -> String {
    url.split(',').map(redact_one).collect::<Vec<_>>().join(",")
}

fn redact_one(url: &str) -> String {
    let (scheme, rest) = match url.split_once("://") {
        Some((scheme, rest)) => (Some(scheme), rest),
        None => (None, url),
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let Some((userinfo, host)) = authority.rsplit_once('@') else {
        return url.to_owned();
    };
    let prefix = scheme.map_or(String::new(), |scheme| format!("{scheme}://"));
    match userinfo.split_once(':') {
        Some((user, _password)) => format!("{prefix}{user}:***@{host}{tail}"),
        // NATS takes a lone token as the credential; elsewhere it is a user name. Without a
        // scheme it is a server of a NATS list.
        None if scheme.is_none_or(|s| matches!(s, "nats" | "tls" | "ws" | "wss")) => {
            format!("{prefix}***@{host}{tail}")
        }
        None => url.to_owned(),
    }
}

/// The user info of the first URL in `url` (a comma-separated list, as NATS and Kafka take
/// them) that has one, percent-decoded: the user (or a lone token) and the password, if any.
/// Client libraries that ignore a URL's user info (async-nats, librdkafka) are given these.
///
/// ```
/// use waybill_outbox_core::url_userinfo;
///
/// assert_eq!(url_userinfo("kafka://h1:9092,kafka://relay:p%40ss@h2:9092"),
///            Some(("relay".to_owned(), Some("p@ss".to_owned()))));
/// assert_eq!(url_userinfo("nats://tok@h1"), Some(("tok".to_owned(), None)));
/// assert_eq!(url_userinfo("kafka://h1:9092/x@y"), None);
/// ```
pub fn url_userinfo(url: &str) -> Option<(String, Option<String>)> {
    url.split(',').find_map(|one| {
        let one = one.trim();
        let rest = one.split_once("://").map_or(one, |(_, rest)| rest);
        let authority = &rest[..rest.find(['/', '?', '#']).unwrap_or(rest.len())];
        let (userinfo, _host) = authority.rsplit_once('@')?;
        Some(match userinfo.split_once(':') {
            Some((user, password)) => (percent_decode(user), Some(percent_decode(password))),
            None => (percent_decode(userinfo), None),
        })
    })
}

/// `%XX` escapes decoded; anything else (an invalid escape included) kept as it is.
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::{percent_decode, redact_url, url_userinfo as auth};

    #[test]
    fn passwords_are_hidden_and_nothing_else() {
        for (url, redacted) in [
            (
                "amqps://u:p%40ss@h:1/v?heartbeat=5",
                "amqps://u:***@h:1/v?heartbeat=5",
            ),
            ("amqp://u@h/v", "amqp://u@h/v"),
            ("amqp://h/v@x:y", "amqp://h/v@x:y"),
            (
                "mysql://root:pw@127.0.0.1:3306/test",
                "mysql://root:***@127.0.0.1:3306/test",
            ),
            (
                "postgres://app@db/orders?sslmode=disable",
                "postgres://app@db/orders?sslmode=disable",
            ),
            (
                "postgres://a:b@db/x?note=a@b",
                "postgres://a:***@db/x?note=a@b",
            ),
            ("nats://127.0.0.1:4222", "nats://127.0.0.1:4222"),
            ("nats://bob:s3cret@host:4222", "nats://bob:***@host:4222"),
            ("nats://tok@host", "nats://***@host"),
            (
                "nats://a:b@h1:4222,nats://c:d@h2",
                "nats://a:***@h1:4222,nats://c:***@h2",
            ),
            ("nats://a@h1,tok@h2", "nats://***@h1,***@h2"),
            ("sqlite://outbox.db", "sqlite://outbox.db"),
            ("not a url", "not a url"),
        ] {
            assert_eq!(redact_url(url), redacted, "{url}");
        }
    }

    #[test]
    fn invalid_escapes_are_kept() {
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%zz%41"), "%zzA");
    }

    #[test]
    fn url_credentials_are_read_and_percent_decoded() {
        assert_eq!(auth("nats://127.0.0.1:4222"), None);
        assert_eq!(auth("tls://h:1/path@x"), None);
        assert_eq!(
            auth("nats://relay:p%40ss%3Aw%25rd@h:4222"),
            Some(("relay".into(), Some("p@ss:w%rd".into())))
        );
        assert_eq!(auth("tls://t0ken@h"), Some(("t0ken".into(), None)));
        assert_eq!(
            auth("nats://h1:4222, nats://u:p@h2:4222"),
            Some(("u".into(), Some("p".into())))
        );
    }
}
