//! Credentials never appear in errors or `Debug` output: a failed connection reports the URL
//! redacted, every secret option of [`ConnectOptions`] shows as `***` or as its file's path,
//! and a secret file that cannot be used is named by path, never quoted.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use waybill_nats::{
    ConnectOptions, ConsumerConfig, Error, NatsConsumer, NatsPublisher, PublisherConfig,
};
use waybill_outbox_core::error_chain;

use common::private::TempDir;

/// Nothing listens on port 1, so the connection fails at once, no server needed.
const URL: &str = "nats://audit:s3cr3t-pw@127.0.0.1:1";
const SECRET: &str = "s3cr3t-pw";

fn assert_redacted(error: &Error) {
    let shown = format!("{error} / {} / {error:?}", error_chain(error));
    assert!(!shown.contains(SECRET), "{shown}");
}

/// Every authentication the options offer, each with the secret inline or in a file.
fn every_option(secrets: &TempDir) -> Vec<ConnectOptions> {
    let file = secrets.secret("secret", SECRET);
    let base = ConnectOptions::default()
        .root_certificates("/nonexistent/ca.pem")
        .client_certificate("/nonexistent/client.pem", "/nonexistent/client-key.pem")
        .require_tls(true);
    vec![
        base.clone().token(SECRET),
        base.clone().token_file(&file),
        base.clone().user_and_password("audit", SECRET),
        base.clone().user_and_password_file("audit", &file),
        base.clone().nkey_seed_file(&file),
        base.clone().credentials_file(&file),
    ]
}

#[test]
fn connection_errors_do_not_show_the_password() {
    let publisher = NatsPublisher::connect(URL, PublisherConfig::default());
    assert_redacted(&publisher.expect_err("nothing listens on port 1"));
    let consumer = NatsConsumer::connect(URL, ConsumerConfig::new("S", "c"));
    assert_redacted(&consumer.expect_err("nothing listens on port 1"));
}

#[test]
fn debug_output_of_every_option_shows_no_secret() {
    let secrets = TempDir::new("waybill-nats-redaction");
    for options in every_option(&secrets) {
        for shown in [
            format!("{options:?}"),
            format!(
                "{:?}",
                PublisherConfig::default().connect_options(options.clone())
            ),
            format!(
                "{:?}",
                ConsumerConfig::new("S", "c").connect_options(options.clone())
            ),
        ] {
            assert!(!shown.contains(SECRET), "{shown}");
        }
    }
}

#[test]
fn connection_errors_with_every_option_show_no_secret() {
    let secrets = TempDir::new("waybill-nats-redaction");
    for options in every_option(&secrets) {
        // Secrets are read (and the missing certificate reported) before connecting.
        let publisher = NatsPublisher::connect(
            URL,
            PublisherConfig::default().connect_options(options.clone()),
        );
        assert_redacted(&publisher.expect_err("a missing CA file"));
        let consumer =
            NatsConsumer::connect(URL, ConsumerConfig::new("S", "c").connect_options(options));
        assert_redacted(&consumer.expect_err("a missing CA file"));
    }
    // Without certificates the connection itself fails, after the secrets were read.
    let file = secrets.secret("password", SECRET);
    for options in [
        ConnectOptions::default().token(SECRET),
        ConnectOptions::default().user_and_password("audit", SECRET),
        ConnectOptions::default().user_and_password_file("audit", &file),
    ] {
        let error =
            NatsPublisher::connect(URL, PublisherConfig::default().connect_options(options))
                .expect_err("nothing listens on port 1");
        assert!(matches!(error, Error::Connect { .. }), "{error:?}");
        assert!(error.is_retryable(), "{error:?}");
        assert_redacted(&error);
    }
}

#[test]
fn a_missing_secret_file_is_named_by_option_and_path() {
    let error = NatsPublisher::connect(
        URL,
        PublisherConfig::default()
            .connect_options(ConnectOptions::default().token_file("/nonexistent/waybill/token")),
    )
    .expect_err("no such file");
    let shown = error_chain(&error);
    assert!(
        matches!(
            error,
            Error::ReadFile {
                what: "token file",
                ..
            }
        ),
        "{error:?}"
    );
    assert!(
        shown.contains("token file /nonexistent/waybill/token"),
        "{shown}"
    );
    assert!(!error.is_retryable());

    let error = NatsPublisher::connect(
        URL,
        PublisherConfig::default().connect_options(
            ConnectOptions::default().root_certificates("/nonexistent/waybill/ca.pem"),
        ),
    )
    .expect_err("no such file");
    assert!(
        matches!(
            error,
            Error::ReadFile {
                what: "CA certificate file",
                ..
            }
        ),
        "{error:?}"
    );
}

#[test]
fn an_unusable_secret_file_is_refused_without_quoting_it() {
    let secrets = TempDir::new("waybill-nats-redaction");
    let file = secrets.secret("not-a-seed", SECRET);
    for (options, what) in [
        (
            ConnectOptions::default().nkey_seed_file(&file),
            "nkey seed file",
        ),
        (
            ConnectOptions::default().credentials_file(&file),
            "credentials file",
        ),
    ] {
        let error =
            NatsPublisher::connect(URL, PublisherConfig::default().connect_options(options))
                .expect_err("not a seed, not a creds file");
        assert!(
            matches!(&error, Error::InvalidSecretFile { what: w, .. } if *w == what),
            "{error:?}"
        );
        assert!(error_chain(&error).contains(what), "{error:?}");
        assert_redacted(&error);
    }
}
