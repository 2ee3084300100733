//! Credentials never appear in errors: a failed connection reports the URL redacted.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use waybill_nats::{ConsumerConfig, NatsConsumer, NatsPublisher, PublisherConfig};

/// Nothing listens on port 1, so the connection fails at once, no server needed.
const URL: &str = "nats://audit:s3cr3t-pw@127.0.0.1:1";

fn assert_redacted(error: &waybill_nats::Error) {
    let shown = format!("{error} / {error:?}");
    assert!(!shown.contains("s3cr3t-pw"), "{shown}");
}

#[test]
fn connection_errors_do_not_show_the_password() {
    let publisher = NatsPublisher::connect(URL, PublisherConfig::default());
    assert_redacted(&publisher.expect_err("nothing listens on port 1"));
    let consumer = NatsConsumer::connect(URL, ConsumerConfig::new("S", "c"));
    assert_redacted(&consumer.expect_err("nothing listens on port 1"));
}
