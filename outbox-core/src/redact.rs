//! [`redact_url`]: connection URLs fit for logs and error messages.

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

#[cfg(test)]
mod tests {
    use super::redact_url;

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
}
