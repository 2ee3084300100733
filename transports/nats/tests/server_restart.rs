//! A private `nats-server` (JetStream, its own port and store) is killed under the publisher and
//! started again: publishing fails retryably while it is down and resumes afterwards, nothing lost.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use waybill_nats::{NatsPublisher, PublisherConfig};
use waybill_outbox_core::{PublishError, Publisher};

use common::{batch, runtime, unique, DEADLINE};

fn server_binary() -> Option<PathBuf> {
    let candidates = [
        std::env::var("NATS_SERVER_BIN").ok(),
        Some("/usr/sbin/nats-server".into()),
        Some("/usr/bin/nats-server".into()),
    ];
    candidates
        .into_iter()
        .flatten()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

fn start(binary: &Path, port: u16, store: &Path) -> Child {
    let child = Command::new(binary)
        .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
        .arg(store)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start nats-server");
    let deadline = Instant::now() + DEADLINE;
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "nats-server did not listen on {port}"
        );
        std::thread::yield_now();
    }
    child
}

#[test]
fn publishing_resumes_after_the_server_is_killed_and_restarted() {
    let Some(binary) = server_binary() else {
        let message = "no nats-server binary (set NATS_SERVER_BIN)";
        if std::env::var("WAYBILL_REQUIRE_SERVERS").is_ok_and(|v| v == "1") {
            panic!("WAYBILL_REQUIRE_SERVERS=1 but {message}");
        }
        let _ = writeln!(std::io::stderr(), "SKIPPED: {message}");
        return;
    };
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let store = std::env::temp_dir().join(unique("nats-store"));
    let url = format!("nats://127.0.0.1:{port}");
    let mut server = start(&binary, port, &store);

    let (stream, topic) = (unique("WB"), unique("t"));
    let mut publisher = NatsPublisher::connect(
        &url,
        PublisherConfig::default().ack_timeout(Duration::from_secs(2)),
    )
    .unwrap();
    publisher.ensure_stream(&stream, &[&topic]).unwrap();
    let before = batch(&topic, 4, 100);
    assert!(publisher.publish(&before).iter().all(Result::is_ok));

    server.kill().unwrap();
    server.wait().unwrap();
    let during = batch(&topic, 4, 100);
    let outcomes = publisher.publish(&during);
    assert!(
        outcomes.iter().all(|o| matches!(
            o,
            Err(PublishError::Retryable(_) | PublishError::NotAttempted)
        )),
        "a dead server gives retryable failures only: {outcomes:?}"
    );

    let mut server = start(&binary, port, &store);
    let deadline = Instant::now() + DEADLINE;
    loop {
        // The relay would retry after its backoff; here the test retries until the client is back.
        let outcomes = publisher.publish(&during);
        if outcomes.iter().all(Result::is_ok) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "publishing did not resume: {outcomes:?}"
        );
        std::thread::sleep(Duration::from_millis(100)); // reconnect backoff, not synchronisation
    }

    let rt = runtime();
    let stored = rt.block_on(async {
        let client = async_nats::connect(&url).await.unwrap();
        let js = async_nats::jetstream::new(client);
        js.get_stream(&stream)
            .await
            .unwrap()
            .info()
            .await
            .unwrap()
            .state
            .messages
    });
    assert_eq!(
        stored, 200,
        "every message of both batches is in the stream, once"
    );
    server.kill().unwrap();
    server.wait().unwrap();
    let _ = std::fs::remove_dir_all(&store);
}
