#![allow(clippy::expect_used, clippy::unwrap_used)]
//! One process per role on a real database server and a real broker. Both relays, the billing
//! consumer and `serve-orders` (the HTTP API and the orders' `PaymentCaptured` consumer) are
//! killed with SIGKILL and restarted, round after round, while `place` writes orders and more
//! come in over `POST /orders`; in the end every order is charged exactly once and paid.

mod common;

use std::process::Child;
use std::thread;
use std::time::{Duration, Instant};

use common::{http, order_service, pg_database, reachable, report, require, serve_orders};

/// Orders written by the `place` process.
const PLACED: i64 = 300;
/// Kill-and-restart rounds.
const ROUNDS: i64 = 4;
/// Orders posted over HTTP right after each restart, while the restarted roles catch up.
const POSTED_PER_ROUND: i64 = 10;
/// How long any one expected change may take: a liveness bound, never a speed claim.
const DEADLINE: Duration = Duration::from_secs(60);

/// The processes of one deployment; all of them are killed when it is dropped, so a failing
/// test leaves nothing running.
struct Deployment {
    args: Vec<String>,
    workers: Vec<Child>,
    orders_service: Child,
    orders_addr: String,
}

/// The roles that run besides `serve-orders`.
const WORKERS: [&[&str]; 3] = [
    &["relay", "--service", "orders"],
    &["relay", "--service", "billing"],
    &["billing"],
];

impl Deployment {
    fn start(args: Vec<String>) -> Self {
        // serve-orders first: it creates the orders schema before anyone else needs it.
        let (orders_service, orders_addr) = serve_orders(&str_args(&args));
        let workers = WORKERS.iter().map(|role| spawn(&args, role)).collect();
        Self {
            args,
            workers,
            orders_service,
            orders_addr,
        }
    }

    /// SIGKILLs every role (no clean shutdown: leases, unacked deliveries and open
    /// transactions are left behind) and starts them again.
    fn kill_and_restart(&mut self) {
        self.kill();
        (self.orders_service, self.orders_addr) = serve_orders(&str_args(&self.args));
        self.workers = WORKERS.iter().map(|role| spawn(&self.args, role)).collect();
    }

    /// Places an order through `POST /orders` of the running `serve-orders`.
    fn post_order(&self, n: i64) {
        let body = format!(r#"{{"customer": "http-{n}", "amount_cents": {}}}"#, 100 + n);
        let (status, answer) = http(&self.orders_addr, "POST", "/orders", &body);
        assert_eq!(status, 201, "{answer}");
    }

    fn kill(&mut self) {
        for child in self.workers.iter_mut().chain([&mut self.orders_service]) {
            child.kill().unwrap(); // SIGKILL
            child.wait().unwrap();
        }
    }
}

impl Drop for Deployment {
    fn drop(&mut self) {
        for child in self.workers.iter_mut().chain([&mut self.orders_service]) {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn str_args(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

fn spawn(args: &[String], role: &[&str]) -> Child {
    order_service().args(args).args(role).spawn().unwrap()
}

/// Polls `report` until `done` holds for it, failing after [`DEADLINE`].
fn wait_for_report(
    args: &[&str],
    what: &str,
    done: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let now = report(args);
        if done(&now) {
            return now;
        }
        assert!(
            Instant::now() < deadline,
            "no {what} within {DEADLINE:?}: {now}"
        );
        thread::sleep(Duration::from_millis(100));
    }
}

fn count(report: &serde_json::Value, field: &str) -> i64 {
    report[field]
        .as_i64()
        .unwrap_or_else(|| panic!("no {field} in {report}"))
}

fn survives_killed_processes(orders_db: &str, billing_db: &str, broker_url: &str) {
    let namespace = format!("t{}", unique());
    let args: Vec<String> = [
        "--orders-db",
        orders_db,
        "--billing-db",
        billing_db,
        "--broker",
        broker_url,
        "--namespace",
        &namespace,
        // Work a killed relay or consumer left reserved is taken up again after 5 s, not the
        // default 30 s, so the test settles sooner; correctness does not depend on either.
        "--relay-lease-secs",
        "5",
        "--ack-wait-secs",
        "5",
    ]
    .map(str::to_owned)
    .to_vec();
    let report_args = str_args(&args);

    let mut deployment = Deployment::start(args.clone());
    let mut placing = spawn(
        &args,
        &[
            "place",
            "--count",
            &PLACED.to_string(),
            "--concurrency",
            "4",
        ],
    );
    let mut posted = 0;
    let mut last = report(&report_args);
    for round in 0..ROUNDS {
        for _ in 0..POSTED_PER_ROUND {
            deployment.post_order(posted);
            posted += 1;
        }
        // Kill only after both consumers got something done since the last kill, so every
        // round interrupts live work rather than a process still starting.
        let (charges, paid) = (count(&last, "charges"), count(&last, "orders_paid"));
        last = wait_for_report(&report_args, &format!("progress in round {round}"), |now| {
            count(now, "charges") > charges && count(now, "orders_paid") > paid
        });
        deployment.kill_and_restart();
    }
    assert!(placing.wait().unwrap().success());

    let orders = PLACED + posted;
    let settled = wait_for_report(&report_args, "settled state", |now| {
        count(now, "orders") == orders
            && count(now, "orders_paid") == orders
            && count(now, "outbox_pending") == 0
    });
    drop(deployment);
    assert_eq!(settled["orders"], orders, "{settled}");
    assert_eq!(settled["orders_charged_once"], orders, "{settled}");
    assert_eq!(settled["orders_charged_more_than_once"], 0, "{settled}");
    assert_eq!(settled["orders_not_charged"], 0, "{settled}");
    assert_eq!(settled["charges"], orders, "{settled}");
    assert_eq!(settled["orders_paid"], orders, "{settled}");
    assert_eq!(settled["outbox_pending"], 0, "{settled}");
    assert_eq!(settled["outbox_parked"], 0, "{settled}");
}

fn amqp_url() -> String {
    std::env::var("AMQP_ADDR").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

fn nats_url() -> String {
    std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into())
}

/// A test's own name suffix for its databases.
fn unique() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..12].to_owned()
}

fn on_postgres(broker_name: &str, broker_url: &str, broker_addr: &str) {
    if require(broker_name, reachable(broker_addr)).is_none() {
        return;
    }
    let id = unique();
    let Some(orders_db) = require("PostgreSQL", pg_database(&format!("orders_{id}"))) else {
        return;
    };
    let billing_db = pg_database(&format!("billing_{id}")).unwrap();
    survives_killed_processes(&orders_db.url, &billing_db.url, broker_url);
}

#[test]
fn postgres_and_rabbitmq_survive_killed_processes() {
    on_postgres("RabbitMQ", &amqp_url(), "127.0.0.1:5672");
}

#[test]
fn postgres_and_nats_survive_killed_processes() {
    on_postgres("NATS", &nats_url(), "127.0.0.1:4222");
}

#[test]
fn postgres_and_kafka_survive_killed_processes() {
    let brokers = std::env::var("KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:19092".into());
    on_postgres("Kafka", &format!("kafka://{brokers}"), &brokers);
}

#[cfg(feature = "mysql")]
#[test]
fn mariadb_and_nats_survive_killed_processes() {
    if require("NATS", reachable("127.0.0.1:4222")).is_none() {
        return;
    }
    let id = unique();
    let Some(orders_db) = require(
        "MySQL/MariaDB",
        common::mysql_database(&format!("orders_{id}")),
    ) else {
        return;
    };
    let billing_db = common::mysql_database(&format!("billing_{id}")).unwrap();
    survives_killed_processes(&orders_db.url, &billing_db.url, &nats_url());
}
