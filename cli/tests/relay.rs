//! `waybill relay` as a process: it publishes a SQLite outbox to NATS JetStream and to RabbitMQ,
//! serves Prometheus metrics whose counters add up to the workload, carries each message's
//! `traceparent` to the consumer's handler, and exits 0 on SIGTERM or SIGINT.
#![allow(clippy::expect_used, clippy::unwrap_used)]

#[path = "../../transports/amqp/tests/common/mod.rs"]
mod amqp_common;
#[path = "../../diesel-backend/tests/common/mod.rs"]
mod common;
#[path = "../../transports/nats/tests/common/mod.rs"]
mod nats_common;
mod support;

use std::collections::{HashMap, HashSet};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use waybill_inbox_core::{Disposition, IncomingMessage};
use waybill_outbox_core::{MessageId, NewOutboxMessage};

/// Liveness bound for every wait: reaching it is a failure, not a measurement.
const DEADLINE: Duration = Duration::from_secs(60);
const MESSAGES: usize = 60;
const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

/// Enqueues the workload: `MESSAGES` messages over 6 keys, each with a traceparent.
fn enqueue(db: &common::TestDb<diesel::SqliteConnection>, topic: &str) -> HashSet<MessageId> {
    let messages: Vec<NewOutboxMessage> = (0..MESSAGES)
        .map(|n| {
            NewOutboxMessage::json(topic, format!("key:{}", n % 6), "Tick", &n)
                .unwrap()
                .with_traceparent(TRACEPARENT)
                .unwrap()
        })
        .collect();
    waybill_diesel::enqueue_all(&mut db.conn(), &messages).unwrap();
    messages.iter().map(NewOutboxMessage::id).collect()
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn start_relay(db_url: &str, broker_url: &str, topic: &str, metrics_port: u16) -> Child {
    start_relay_with(db_url, broker_url, topic, metrics_port, &[])
}

fn start_relay_with(
    db_url: &str,
    broker_url: &str,
    topic: &str,
    metrics_port: u16,
    extra: &[&str],
) -> Child {
    Command::new(env!("CARGO_BIN_EXE_waybill"))
        .args([
            "--database-url",
            db_url,
            "relay",
            "--broker-url",
            broker_url,
        ])
        .args(["--topics", topic, "--batch-size", "7", "--relays", "2"])
        .args(["--metrics-addr", &format!("127.0.0.1:{metrics_port}")])
        .args(["--stats-interval", "50ms", "--poll-interval", "100ms"])
        .args(extra)
        .env_remove("DATABASE_URL")
        .env_remove("BROKER_URL")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("waybill relay starts")
}

/// The body of `GET path` on the loopback `port`, or `None` while nothing answers there.
fn http_get(port: u16, path: &str) -> Option<String> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(DEADLINE)).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
}

/// `GET /metrics`, or `None` while the endpoint is not up yet.
fn scrape(port: u16) -> Option<String> {
    http_get(port, "/metrics")
}

/// Sample values by their full series name (`name{labels}`).
fn samples(body: &str) -> HashMap<String, f64> {
    body.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            Some((series.to_owned(), value.parse().ok()?))
        })
        .collect()
}

/// The sum over every series of metric `name`, and how many series there are.
fn total(samples: &HashMap<String, f64>, name: &str) -> (f64, usize) {
    let series: Vec<f64> = samples
        .iter()
        .filter(|(series, _)| series.split('{').next() == Some(name))
        .map(|(_, value)| *value)
        .collect();
    (series.iter().sum(), series.len())
}

/// Scrapes until `done` holds for the samples, or panics at the deadline.
fn scrape_until(
    port: u16,
    what: &str,
    done: impl Fn(&HashMap<String, f64>) -> bool,
) -> HashMap<String, f64> {
    let started = Instant::now();
    let mut last = String::new();
    while started.elapsed() < DEADLINE {
        if let Some(body) = scrape(port) {
            let parsed = samples(&body);
            if done(&parsed) {
                return parsed;
            }
            last = body;
        }
        std::thread::sleep(Duration::from_millis(50)); // polling interval, not a synchronisation
    }
    panic!("metrics never showed {what}; last scrape:\n{last}");
}

/// Checks the metrics after the workload, consumes it with `consume`, then stops the relay.
fn check_relay_run(
    relay: Child,
    port: u16,
    topic: &str,
    ids: &HashSet<MessageId>,
    signal: &str,
    mut consume: impl FnMut(&mut dyn FnMut(&IncomingMessage) -> Disposition),
) {
    let n = MESSAGES as f64;
    let published = scrape_until(port, "every message published", |s| {
        total(s, "waybill_relay_published_total").0 >= n
    });
    assert_eq!(total(&published, "waybill_relay_published_total"), (n, 2)); // one series per relay
    assert_eq!(total(&published, "waybill_relay_parked_total").0, 0.0);
    assert_eq!(total(&published, "waybill_relay_fenced_off_total").0, 0.0);
    assert!(
        published
            .keys()
            .any(|k| k.starts_with("waybill_relay_batch_duration_seconds")),
        "{published:?}"
    );
    let pending = format!("waybill_outbox_pending{{topic=\"{topic}\"}}");
    let age = format!("waybill_outbox_oldest_pending_age_seconds{{topic=\"{topic}\"}}");
    scrape_until(port, "the outbox gauges at zero", |s| {
        s.get(&pending) == Some(&0.0) && s.get(&age) == Some(&0.0)
    });

    let mut seen = HashSet::new();
    let mut traces = HashSet::new();
    let started = Instant::now();
    while seen.len() < ids.len() && started.elapsed() < DEADLINE {
        consume(&mut |msg: &IncomingMessage| {
            seen.insert(msg.id);
            traces.insert(msg.traceparent().map(str::to_owned));
            Disposition::Ack
        });
    }
    assert_eq!(&seen, ids, "the broker holds exactly the enqueued messages");
    assert_eq!(traces, HashSet::from([Some(TRACEPARENT.to_owned())]));

    let (code, stderr) = support::stop_relay(relay, signal, DEADLINE);
    assert_eq!(code, Some(0), "stderr:\n{stderr}");
}

#[test]
fn relay_publishes_to_nats_exports_metrics_carries_traceparent_and_stops_on_sigterm() {
    let Some(mut nats) = nats_common::nats() else {
        return;
    };
    let db = common::sqlite().unwrap();
    let topic = nats_common::unique("ops");
    // `--topics` makes the relay create this stream; the harness deletes it afterwards.
    nats.forget_later(&topic);
    let ids = enqueue(&db, &topic);
    let port = free_port();
    let relay = start_relay(&db.url, &nats.url, &topic, port);
    let mut consumer = None;
    check_relay_run(relay, port, &topic, &ids, "-TERM", |mut handler| {
        // The stream exists once the relay has started.
        let consumer = consumer.get_or_insert_with(|| {
            waybill_nats::NatsConsumer::connect(
                &nats.url,
                waybill_nats::ConsumerConfig::new(&topic, "ops-test"),
            )
            .expect("a NATS consumer")
        });
        consumer
            .run_once(&mut handler, 100, Duration::from_millis(500))
            .expect("a NATS pull");
    });
}

#[test]
fn relay_publishes_to_rabbitmq_exports_metrics_carries_traceparent_and_stops_on_sigint() {
    let Some(mut broker) = amqp_common::broker() else {
        return;
    };
    let db = common::sqlite().unwrap();
    let topic = amqp_common::unique("ops");
    let queue = amqp_common::unique("ops-q");
    broker.cleanup_queue(&queue);
    broker.cleanup_exchange(&topic);
    // Bound before the relay publishes: unroutable messages would be parked.
    let mut consumer = waybill_amqp::AmqpConsumer::connect(
        &broker.addr,
        waybill_amqp::ConsumerConfig::new(&queue).bind(&topic, "#"),
    )
    .expect("an AMQP consumer");
    let ids = enqueue(&db, &topic);
    let port = free_port();
    let relay = start_relay(&db.url, &broker.addr, &topic, port);
    check_relay_run(relay, port, &topic, &ids, "-INT", |mut handler| {
        consumer
            .run_once(&mut handler, 100, Duration::from_millis(500))
            .expect("an AMQP consume");
    });
}

/// `amqps://` with a private CA and a client certificate, to RabbitMQ behind a TLS terminator
/// that demands both; `--amqp-*` options without an `amqps://` URL are refused.
#[test]
fn relay_publishes_over_amqps_with_a_private_ca_and_a_client_certificate() {
    let Some(mut broker) = amqp_common::broker() else {
        return;
    };
    let Some(openssl) = waybill_testkit::tls::openssl() else {
        return;
    };
    let pki = waybill_testkit::tls::Pki::new(&openssl);
    let upstream = broker
        .addr
        .split('@')
        .nth(1)
        .unwrap()
        .split('/')
        .next()
        .unwrap();
    let terminator = waybill_testkit::tls::TlsTerminator::start(&pki, upstream, true);
    let url = format!("amqps://guest:guest@localhost:{}/%2f", terminator.port());
    let db = common::sqlite().unwrap();
    let topic = amqp_common::unique("ops-tls");
    let queue = amqp_common::unique("ops-tls-q");
    broker.cleanup_queue(&queue);
    broker.cleanup_exchange(&topic);
    let mut consumer = waybill_amqp::AmqpConsumer::connect(
        &broker.addr,
        waybill_amqp::ConsumerConfig::new(&queue).bind(&topic, "#"),
    )
    .expect("an AMQP consumer");
    let ids = enqueue(&db, &topic);
    let path = |p: &std::path::Path| p.to_string_lossy().into_owned();
    let (ca, cert, key) = (path(&pki.ca), path(&pki.client_cert), path(&pki.client_key));
    let tls = [
        "--amqp-ca",
        &ca,
        "--amqp-client-cert",
        &cert,
        "--amqp-client-key",
        &key,
    ];
    let misfit = support::waybill(
        &db.url,
        &[&["relay", "--broker-url", &broker.addr][..], &tls].concat(),
        "",
    );
    misfit.assert_code(1);
    assert!(misfit.stderr.contains("need an amqps://"), "{misfit:?}");

    let port = free_port();
    let relay = start_relay_with(&db.url, &url, &topic, port, &tls);
    check_relay_run(relay, port, &topic, &ids, "-TERM", |mut handler| {
        consumer
            .run_once(&mut handler, 100, Duration::from_millis(500))
            .expect("an AMQP consume");
    });
}

#[test]
fn relay_exits_1_on_a_broker_it_cannot_use_and_redacts_the_password() {
    let db = common::sqlite().unwrap();
    let unsupported = support::waybill(&db.url, &["relay", "--broker-url", "mqtt://k:1883"], "");
    unsupported.assert_code(1);
    assert!(
        unsupported.stderr.contains("unsupported broker URL"),
        "{unsupported:?}"
    );
    let url = "amqp://guest:s3cret@127.0.0.1:1/%2f";
    let refused = support::waybill(&db.url, &["relay", "--broker-url", url], "");
    refused.assert_code(1);
    assert!(
        refused.stderr.contains("guest:***@127.0.0.1:1"),
        "{refused:?}"
    );
    assert!(!refused.stderr.contains("s3cret"), "{refused:?}");
    support::waybill(&db.url, &["relay"], "").assert_code(2); // --broker-url is required
}

/// `PROMETHEUS`, or `prometheus` on the path; `None` (skipped) when it does not run.
fn prometheus() -> Option<String> {
    let prometheus = std::env::var("PROMETHEUS").unwrap_or_else(|_| "prometheus".into());
    match Command::new(&prometheus).arg("--version").output() {
        Ok(output) if output.status.success() => Some(prometheus),
        outcome => {
            let why = match outcome {
                Ok(output) => format!("{prometheus} --version exited with {}", output.status),
                Err(error) => format!("{prometheus} does not run: {error}"),
            };
            waybill_testkit::skip(
                "a Prometheus server (Debian package prometheus)",
                "PROMETHEUS",
                &why,
            );
            None
        }
    }
}

/// A Prometheus server scraping `target` every 200 ms, stopped when dropped.
struct Prometheus {
    child: Child,
    port: u16,
    _dir: nats_common::private::TempDir,
}

impl Prometheus {
    fn start(binary: &str, target: &str) -> Self {
        let dir = nats_common::private::TempDir::new("prometheus");
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 200ms\n  scrape_timeout: 200ms\n\
                 scrape_configs:\n  - job_name: waybill-relay\n    static_configs:\n      \
                 - targets: ['{target}']\n"
            ),
        )
        .unwrap();
        let port = free_port();
        let child = Command::new(binary)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("prometheus starts");
        Self {
            child,
            port,
            _dir: dir,
        }
    }

    /// The samples an instant query returns (`None` while the server is not up yet).
    fn query(&self, expr: &str) -> Option<Vec<f64>> {
        let encoded: String = expr
            .bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                    char::from(b).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect();
        let body = http_get(self.port, &format!("/api/v1/query?query={encoded}"))?;
        let body: serde_json::Value = serde_json::from_str(&body).ok()?;
        assert_eq!(body["status"], "success", "{expr}: {body}");
        let values = body["data"]["result"]
            .as_array()?
            .iter()
            .filter_map(|series| series["value"][1].as_str()?.parse().ok())
            .collect();
        Some(values)
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Every query of the Grafana dashboard in `docs/prometheus`, run against a real Prometheus that
/// scrapes a live `waybill relay`, returns at least one finite value; and the dashboard shows
/// every metric the relay exports.
#[test]
fn every_dashboard_query_returns_data_from_a_prometheus_scraping_the_relay() {
    let Some(binary) = prometheus() else { return };
    let Some(mut nats) = nats_common::nats() else {
        return;
    };
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../docs/prometheus/waybill-dashboard.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let queries: Vec<String> = dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|panel| panel["targets"].as_array().unwrap())
        .map(|target| target["expr"].as_str().unwrap().to_owned())
        .collect();
    use waybill_outbox_core::metrics as m;
    for name in [
        m::RELAY_PUBLISHED,
        m::RELAY_RETRIED,
        m::RELAY_PARKED,
        m::RELAY_RELEASED,
        m::RELAY_BROKER_UNAVAILABLE,
        m::RELAY_FENCED_OFF,
        m::RELAY_LEASE_TAKEOVERS,
        m::RELAY_BATCH_SECONDS,
        m::RELAY_MESSAGE_AGE_SECONDS,
        m::OUTBOX_PENDING,
        m::OUTBOX_PARKED,
        m::OUTBOX_OLDEST_PENDING_AGE,
    ] {
        assert!(
            queries.iter().any(|query| query.contains(name)),
            "no dashboard panel shows {name}"
        );
    }

    let db = common::sqlite().unwrap();
    let topic = nats_common::unique("dash");
    nats.forget_later(&topic);
    let port = free_port();
    let relay = start_relay(&db.url, &nats.url, &topic, port);
    let prometheus = Prometheus::start(&binary, &format!("127.0.0.1:{port}"));
    // Messages keep arriving while the queries run, so rates and quantiles have data.
    let done = std::sync::atomic::AtomicBool::new(false);
    let pool = db.pool.clone();
    std::thread::scope(|scope| {
        scope.spawn(|| {
            let mut n = 0;
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                let msg =
                    NewOutboxMessage::json(&topic, format!("key:{}", n % 6), "Tick", &n).unwrap();
                waybill_diesel::enqueue(&mut pool.get().unwrap(), &msg).unwrap();
                n += 1;
                std::thread::sleep(Duration::from_millis(10)); // a steady trickle, not a synchronisation
            }
        });
        let mut unanswered: Vec<(String, String)> = queries
            .iter()
            .map(|query| {
                let runnable = query
                    .replace("$__rate_interval", "2s")
                    .replace("$topic", ".*");
                (query.clone(), runnable)
            })
            .collect();
        let started = Instant::now();
        let mut last = Vec::new();
        while !unanswered.is_empty() && started.elapsed() < DEADLINE {
            last.clear();
            unanswered.retain(|(query, runnable)| match prometheus.query(runnable) {
                Some(values) if values.iter().any(|v| v.is_finite()) => false,
                outcome => {
                    last.push(format!("{query}: {outcome:?}"));
                    true
                }
            });
            std::thread::sleep(Duration::from_millis(100)); // polling interval, not a synchronisation
        }
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        // The relay is stopped before asserting, so a failure does not leave it running.
        let (code, stderr) = support::stop_relay(relay, "-TERM", DEADLINE);
        assert!(
            unanswered.is_empty(),
            "dashboard queries without data:\n{}",
            last.join("\n")
        );
        assert_eq!(code, Some(0), "stderr:\n{stderr}");
    });
}
