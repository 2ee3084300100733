#![allow(clippy::expect_used, clippy::unwrap_used)]
//! The one-command run, end to end, as a user runs it: embedded (SQLite and the in-process
//! broker), and on real database servers and brokers.

mod common;

use std::process::Stdio;
use std::thread;
use std::time::{Duration, Instant};

use common::{order_service, reachable, report, require};

/// The number after `label` in the audit table.
fn audit_line(stdout: &str, label: &str) -> i64 {
    let line = stdout
        .lines()
        .find(|line| line.starts_with(label))
        .unwrap_or_else(|| panic!("no {label:?} line in:\n{stdout}"));
    line[label.len()..]
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

#[test]
fn embedded_run_charges_every_order_exactly_once_and_pays_it() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let output = order_service()
        .args([
            "--orders",
            "50",
            "--concurrency",
            "3",
            "--redeliver-fraction",
            "0.5",
        ])
        .arg("--data-dir")
        .arg(&data_dir)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "stdout:\n{stdout}\nstderr:\n{stderr}"
    );

    let line = |label: &str| audit_line(&stdout, label);
    assert_eq!(line("orders placed:"), 50);
    assert_eq!(line("charges:"), 50);
    assert_eq!(line("orders charged exactly once:"), 50);
    assert_eq!(line("orders charged more than once:"), 0);
    assert_eq!(line("orders paid:"), 50);
    assert!(line("duplicates skipped by inboxes:") > 0, "{stdout}");
    assert!(stdout.contains("throughput:"), "{stdout}");
    // Progress on stderr however short the run: a first line, then a last one when settled.
    // (Warnings, say of a busy SQLite file under load, may come in between.)
    let progress: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("placing ") || l.contains(" s: placed "))
        .collect();
    assert!(
        progress
            .first()
            .is_some_and(|l| l.starts_with("placing 50 orders")),
        "{stderr}"
    );
    assert!(
        progress
            .last()
            .is_some_and(|l| l.contains("placed 50/50") && l.ends_with("settled")),
        "{stderr}"
    );

    // The report subcommand reads the same databases and agrees.
    let output = order_service()
        .arg("report")
        .arg("--data-dir")
        .arg(&data_dir)
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(report["orders"], 50);
    assert_eq!(report["orders_paid"], 50);
    assert_eq!(report["charges"], 50);
    assert_eq!(report["orders_charged_once"], 50);
    assert_eq!(report["orders_charged_more_than_once"], 0);
    assert_eq!(report["orders_not_charged"], 0);
    assert_eq!(report["outbox_pending"], 0);
    assert_eq!(report["outbox_parked"], 0);
    assert!(report["inbox_duplicates"].as_i64().unwrap() > 0, "{report}");
    assert_eq!(
        report["inbox_duplicates"].as_i64().unwrap(),
        line("duplicates skipped by inboxes:")
    );
}

#[test]
fn a_failing_writer_ends_the_run_at_once_with_its_error() {
    let dir = tempfile::tempdir().unwrap();
    // Enough orders and time that waiting for the other writers or the deadline would not end
    // before the test's own deadline below.
    let mut run = order_service()
        .args(["--orders", "10000000", "--timeout-secs", "3600"])
        .args(["--fail-at-order", "20"])
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(status) = run.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            run.kill().unwrap();
            panic!("the run went on after its writer failed");
        }
        thread::sleep(Duration::from_millis(50));
    };
    let output = run.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!status.success(), "{stderr}");
    assert!(
        stderr.contains("error: placing order 20 failed: injected by --fail-at-order"),
        "{stderr}"
    );
    // The audit still shows where the run stood.
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("orders placed:"), "{stdout}");
}

/// The one-command run on real servers, twice on the same databases: each run's table counts
/// its own orders, and `report` then sees both runs' orders charged once and paid. The first
/// run is configured by flags, the second by the environment, where a flag still wins.
fn one_command_run_on_servers(orders_db: &str, billing_db: &str, broker: &str) {
    let namespace = format!("t{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    let args = [
        "--orders-db",
        orders_db,
        "--billing-db",
        billing_db,
        "--broker",
        broker,
        "--namespace",
        &namespace,
    ];
    for by_env in [false, true] {
        let mut run = order_service();
        run.args(["--orders", "40", "--concurrency", "2"]);
        if by_env {
            run.env("ORDERS_DATABASE_URL", orders_db)
                .env("BILLING_DATABASE_URL", billing_db)
                .env("BROKER_NAMESPACE", &namespace)
                .env("BROKER_URL", "nats://127.0.0.1:1")
                .args(["--broker", broker]);
        } else {
            run.args(args);
        }
        let output = run.output().unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            output.status.success(),
            "stdout:\n{stdout}\nstderr:\n{stderr}"
        );
        for label in [
            "orders placed:",
            "charges:",
            "orders charged exactly once:",
            "orders paid:",
        ] {
            assert_eq!(audit_line(&stdout, label), 40, "{label}\n{stdout}");
        }
        assert_eq!(audit_line(&stdout, "messages published:"), 80, "{stdout}");
        assert_eq!(
            audit_line(&stdout, "orders charged more than once:"),
            0,
            "{stdout}"
        );
    }
    let after = report(&args);
    assert_eq!(after["orders"], 80, "{after}");
    assert_eq!(after["orders_charged_once"], 80, "{after}");
    assert_eq!(after["orders_paid"], 80, "{after}");
    assert_eq!(after["outbox_pending"], 0, "{after}");
}

#[test]
fn one_command_run_on_postgres_and_nats_charges_every_order_once() {
    if require("NATS", reachable("127.0.0.1:4222")).is_none() {
        return;
    }
    let id = &uuid::Uuid::new_v4().simple().to_string()[..12];
    let Some(orders_db) = require("PostgreSQL", common::pg_database(&format!("orders_{id}")))
    else {
        return;
    };
    let billing_db = common::pg_database(&format!("billing_{id}")).unwrap();
    let nats = std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into());
    one_command_run_on_servers(&orders_db.url, &billing_db.url, &nats);
}

#[cfg(feature = "mysql")]
#[test]
fn one_command_run_on_mariadb_and_rabbitmq_charges_every_order_once() {
    if require("RabbitMQ", reachable("127.0.0.1:5672")).is_none() {
        return;
    }
    let id = &uuid::Uuid::new_v4().simple().to_string()[..12];
    let Some(orders_db) = require(
        "MySQL/MariaDB",
        common::mysql_database(&format!("orders_{id}")),
    ) else {
        return;
    };
    let billing_db = common::mysql_database(&format!("billing_{id}")).unwrap();
    let amqp = std::env::var("AMQP_ADDR")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    one_command_run_on_servers(&orders_db.url, &billing_db.url, &amqp);
}
