#![allow(clippy::expect_used, clippy::unwrap_used)]
//! The order service over a secured broker: the one-command run against RabbitMQ behind a TLS
//! terminator that demands a client certificate from a private CA, with the flags `waybill
//! relay` takes (`--amqp-ca`, `--amqp-client-cert`, `--amqp-client-key`) and the password read
//! from `--broker-password-file`. Its relays and both consumers go over TLS; without the CA the
//! run is refused.

mod common;

use common::{order_service, reachable, require};
use waybill_testkit::tls::{openssl, Pki, TempDir, TlsTerminator};

const ORDERS: i64 = 20;

#[test]
fn one_command_run_over_amqps_with_a_client_certificate_and_a_password_file() {
    let amqp = std::env::var("AMQP_ADDR")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    let upstream = amqp
        .trim_start_matches("amqp://")
        .rsplit_once('@')
        .map_or("127.0.0.1:5672", |(_, rest)| rest)
        .split('/')
        .next()
        .unwrap()
        .to_owned();
    if require("RabbitMQ", reachable(&upstream)).is_none() {
        return;
    }
    let Some(openssl) = openssl() else { return };
    let pki = Pki::new(&openssl);
    let terminator = TlsTerminator::start(&pki, &upstream, true);
    let dir = TempDir::new("order-service-tls");
    // The shared broker's default user; its password only in the file.
    let password_file = dir.secret("broker-password", "guest");
    let namespace = format!("t{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    let path = |p: &std::path::Path| p.to_string_lossy().into_owned();
    let run = |with_ca: bool| {
        let mut run = order_service();
        run.args(["--orders", &ORDERS.to_string(), "--concurrency", "2"])
            .args([
                "--data-dir",
                &path(&dir.path().join(format!("data-{with_ca}"))),
            ])
            .args(["--namespace", &namespace])
            .args([
                "--broker",
                &format!("amqps://guest@localhost:{}/%2f", terminator.port()),
            ])
            .args(["--broker-password-file", &path(&password_file)])
            .args(["--amqp-client-cert", &path(&pki.client_cert)])
            .args(["--amqp-client-key", &path(&pki.client_key)]);
        if with_ca {
            run.args(["--amqp-ca", &path(&pki.ca)]);
        }
        let output = run.output().unwrap();
        (
            output.status.success(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };

    // Without the private CA the broker's certificate is not trusted.
    let (ok, _, stderr) = run(false);
    assert!(!ok && stderr.contains("UnknownIssuer"), "{stderr}");

    let (ok, stdout, stderr) = run(true);
    assert!(ok, "stdout:\n{stdout}\nstderr:\n{stderr}");
    for label in ["orders charged exactly once:", "orders paid:"] {
        let line = stdout.lines().find(|line| line.starts_with(label));
        let count = line.and_then(|line| line[label.len()..].split_whitespace().next());
        assert_eq!(
            count,
            Some(ORDERS.to_string().as_str()),
            "{label}\n{stdout}"
        );
    }
    assert!(
        !stdout.contains(":guest@") && !stderr.contains(":guest@"),
        "{stderr}"
    );
}
