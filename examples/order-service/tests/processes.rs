#![allow(clippy::expect_used, clippy::unwrap_used)]
//! One process per role on PostgreSQL and a real broker. Relay and billing are killed with
//! SIGKILL and restarted while orders flow; in the end every order is charged exactly once and
//! paid.

mod common;

use std::process::Child;
use std::thread;
use std::time::{Duration, Instant};

use common::{fresh_pg_database, order_service, reachable, report, require, serve_orders};

const ORDERS: i64 = 300;

fn survives_killed_relays_and_consumers(broker_name: &str, broker_url: &str, broker_addr: &str) {
    if require(broker_name, reachable(broker_addr)).is_none() {
        return;
    }
    let id = uuid::Uuid::new_v4().simple().to_string()[..12].to_owned();
    let Some(orders_db) = require("PostgreSQL", fresh_pg_database(&format!("orders_{id}"))) else {
        return;
    };
    let billing_db = fresh_pg_database(&format!("billing_{id}")).unwrap();
    let namespace = format!("t{id}");
    let args: Vec<&str> = vec![
        "--orders-db",
        &orders_db,
        "--billing-db",
        &billing_db,
        "--broker",
        broker_url,
        "--namespace",
        &namespace,
    ];
    let start =
        |role: &[&str]| -> Child { order_service().args(&args).args(role).spawn().unwrap() };

    let (mut orders_service, _addr) = serve_orders(&args);
    let mut placing = start(&[
        "place",
        "--count",
        &ORDERS.to_string(),
        "--concurrency",
        "4",
    ]);
    let roles: [&[&str]; 3] = [
        &["relay", "--service", "orders"],
        &["relay", "--service", "billing"],
        &["billing"],
    ];
    let mut running: Vec<Child> = roles.iter().map(|role| start(role)).collect();
    for _ in 0..3 {
        thread::sleep(Duration::from_millis(700));
        for child in &mut running {
            child.kill().unwrap(); // SIGKILL: no clean shutdown, leases and acks left behind
            child.wait().unwrap();
        }
        running = roles.iter().map(|role| start(role)).collect();
    }
    assert!(placing.wait().unwrap().success());

    let deadline = Instant::now() + Duration::from_secs(120);
    let settled = loop {
        let now = report(&args);
        if now["orders_paid"] == ORDERS && now["outbox_pending"] == 0 || Instant::now() > deadline {
            break now;
        }
        thread::sleep(Duration::from_millis(250));
    };
    for child in running.iter_mut().chain([&mut orders_service]) {
        child.kill().unwrap();
        child.wait().unwrap();
    }
    assert_eq!(settled["orders"], ORDERS, "{settled}");
    assert_eq!(settled["orders_charged_once"], ORDERS, "{settled}");
    assert_eq!(settled["orders_charged_more_than_once"], 0, "{settled}");
    assert_eq!(settled["orders_not_charged"], 0, "{settled}");
    assert_eq!(settled["charges"], ORDERS, "{settled}");
    assert_eq!(settled["orders_paid"], ORDERS, "{settled}");
    assert_eq!(settled["outbox_pending"], 0, "{settled}");
    assert_eq!(settled["outbox_parked"], 0, "{settled}");
}

#[test]
fn postgres_and_rabbitmq_survive_killed_relays_and_billing() {
    let url = std::env::var("AMQP_ADDR")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned());
    survives_killed_relays_and_consumers("RabbitMQ", &url, "127.0.0.1:5672");
}

#[test]
fn postgres_and_nats_survive_killed_relays_and_billing() {
    let url = std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".to_owned());
    survives_killed_relays_and_consumers("NATS", &url, "127.0.0.1:4222");
}
