//! Credentials never appear in errors: a failed connection reports the address redacted.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::time::Duration;

use waybill_amqp::{AmqpConsumer, AmqpPublisher, ConsumerConfig, PublisherConfig};

/// Nothing listens on port 1, so the connection fails at once, no server needed.
const ADDR: &str = "amqp://guest:s3cr3t-pw@127.0.0.1:1/%2f";

fn assert_redacted(error: &waybill_amqp::Error) {
    let shown = format!("{error} / {error:?}");
    assert!(!shown.contains("s3cr3t-pw"), "{shown}");
}

#[test]
fn connection_errors_do_not_show_the_password() {
    let publisher = AmqpPublisher::connect(
        ADDR,
        PublisherConfig::default().connect_timeout(Duration::from_secs(2)),
    );
    assert_redacted(&publisher.expect_err("nothing listens on port 1"));
    let consumer = AmqpConsumer::connect(
        ADDR,
        ConsumerConfig::new("q").connect_timeout(Duration::from_secs(2)),
    );
    assert_redacted(&consumer.expect_err("nothing listens on port 1"));
}
