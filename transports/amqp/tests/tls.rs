//! `amqps://` with a private CA and a client certificate, against RabbitMQ behind a TLS
//! terminator that demands both (certificates made by the test with `openssl`): the right ones
//! publish and consume; a wrong CA, a missing client certificate, plain AMQP on the TLS port and
//! a missing CA file are each refused, naming the cause.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::{unique, PATIENCE};
use waybill_amqp::{AmqpConsumer, AmqpPublisher, ConsumerConfig, PublisherConfig, TlsOptions};
use waybill_inbox_core::{Disposition, IncomingMessage};
use waybill_outbox_core::{error_chain, Publisher};
use waybill_testkit::outbox::stored;
use waybill_testkit::tls::{openssl, Pki, TlsTerminator};

const MESSAGES: i64 = 10;

/// `AMQP_ADDR` with the scheme `amqps` and the host `localhost:<port>`, credentials and vhost
/// kept; and the host:port the terminator forwards to.
fn tls_addr(addr: &str, port: u16) -> (String, String) {
    let rest = addr
        .strip_prefix("amqp://")
        .expect("AMQP_ADDR starts with amqp://");
    let (credentials, rest) = rest.rsplit_once('@').unwrap_or(("", rest));
    let (host, vhost) = rest.split_once('/').unwrap_or((rest, ""));
    let credentials = if credentials.is_empty() {
        String::new()
    } else {
        format!("{credentials}@")
    };
    (
        format!("amqps://{credentials}localhost:{port}/{vhost}"),
        host.to_owned(),
    )
}

fn refused_publisher(addr: &str, tls: TlsOptions) -> String {
    let config = PublisherConfig::default()
        .connect_timeout(Duration::from_secs(5))
        .tls(tls);
    let error = AmqpPublisher::connect(addr, config).expect_err("refused");
    error_chain(&error)
}

#[test]
fn amqps_with_a_private_ca_and_a_client_certificate_publishes_and_consumes_and_refuses_the_rest() {
    let Some(mut broker) = common::broker() else {
        return;
    };
    let Some(openssl) = openssl() else { return };
    let pki = Pki::new(&openssl);
    let (_, upstream) = tls_addr(&broker.addr, 0);
    let terminator = TlsTerminator::start(&pki, &upstream, true);
    let (addr, _) = tls_addr(&broker.addr, terminator.port());
    let tls = TlsOptions::default()
        .root_certificates(&pki.ca)
        .client_certificate(&pki.client_cert, &pki.client_key);

    let wrong_ca = refused_publisher(
        &addr,
        TlsOptions::default()
            .root_certificates(&pki.wrong_ca)
            .client_certificate(&pki.client_cert, &pki.client_key),
    );
    assert!(wrong_ca.contains("UnknownIssuer"), "{wrong_ca}");
    let no_client_cert = refused_publisher(&addr, TlsOptions::default().root_certificates(&pki.ca));
    assert!(
        no_client_cert.contains("CertificateRequired"),
        "{no_client_cert}"
    );
    let plain = refused_publisher(&addr.replacen("amqps://", "amqp://", 1), tls.clone());
    // The terminator answers plain AMQP with a TLS alert, which is no AMQP frame.
    assert!(plain.contains("failed to parse"), "{plain}");
    let missing = refused_publisher(
        &addr,
        TlsOptions::default().root_certificates(pki.dir.path().join("nope.pem")),
    );
    assert!(
        missing.contains("reading the CA certificate file") && missing.contains("nope.pem"),
        "{missing}"
    );
    for refusal in [&wrong_ca, &no_client_cert, &plain, &missing] {
        assert!(!refusal.contains("guest:guest"), "{refusal}");
    }

    let topic = unique("tls-orders");
    let queue = unique("tls-q");
    broker.cleanup_queue(&queue);
    broker.cleanup_exchange(&topic);
    let mut consumer = AmqpConsumer::connect(
        &addr,
        ConsumerConfig::new(&queue)
            .bind(&topic, "#")
            .tls(tls.clone()),
    )
    .expect("a consumer over TLS");
    let mut publisher =
        AmqpPublisher::connect(&addr, PublisherConfig::default().tls(tls)).expect("TLS");
    let batch: Vec<_> = (1..=MESSAGES)
        .map(|n| stored(n, &topic, &format!("k{}", n % 3), &format!("{{\"n\":{n}}}")))
        .collect();
    assert!(publisher.publish(&batch).iter().all(Result::is_ok));
    let ids: HashSet<_> = batch.iter().map(|m| m.id).collect();
    let mut seen = HashSet::new();
    let started = Instant::now();
    while seen.len() < ids.len() && started.elapsed() < PATIENCE {
        consumer
            .run_once(
                &mut |msg: &IncomingMessage| {
                    seen.insert(msg.id);
                    Disposition::Ack
                },
                100,
                Duration::from_millis(300),
            )
            .expect("a consume over TLS");
    }
    assert_eq!(seen, ids);
}
