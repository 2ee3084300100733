//! `waybill partitions` on PostgreSQL: adopt, status, create-ahead and roll-off with `--json`,
//! two roll-offs from two processes at once, revert; refused on other databases.
#![allow(clippy::expect_used, clippy::unwrap_used)]

#[path = "../../diesel-backend/tests/common/mod.rs"]
mod common;
mod support;

use std::collections::HashSet;
use std::process::{Command, Stdio};

use diesel::connection::SimpleConnection;

/// `count` inbox records `days` ago, in a partition made for them (as a consumer wrote them).
fn old_records(db: &common::TestDb<diesel::PgConnection>, days: i64, count: usize) {
    let at = format!("statement_timestamp() - interval '{days} days'");
    let mut conn = db.conn();
    conn.batch_execute(&format!(
        "SELECT waybill_ensure_partition('inbox_processed_log', {at});
         INSERT INTO inbox_processed (consumer, dedup_key, processed_at)
         SELECT 'billing', gen_random_uuid()::text, {at} FROM generate_series(1, {count});"
    ))
    .unwrap();
}

#[test]
fn partitions_adopt_report_create_ahead_roll_off_and_revert() {
    let Some(db) = common::postgres() else { return };
    let run = |args: &[&str], stdin: &str| support::waybill(&db.url, args, stdin);

    run(&["partitions", "status"], "")
        .assert_code(1)
        .stderr
        .contains("not adopted")
        .then_some(())
        .expect("status says the layout is not adopted");
    run(&["partitions", "adopt"], "n\n").assert_code(3);
    let adopted = run(
        &[
            "partitions",
            "adopt",
            "--width",
            "1d",
            "--inbox-retention",
            "2d",
            "--yes",
        ],
        "",
    );
    adopted.assert_code(0);
    assert!(adopted.stdout.contains("adopted"), "{adopted:?}");
    old_records(&db, 5, 10);

    let status = run(&["--json", "partitions", "status"], "");
    let status = status.assert_code(0).json();
    let tables = status["tables"].as_array().unwrap();
    assert_eq!(tables.len(), 2);
    let inbox = tables
        .iter()
        .find(|t| t["table"] == "inbox_processed_log")
        .unwrap();
    assert_eq!(inbox["width_s"], 86_400.0);
    assert_eq!(inbox["retention_s"], 172_800.0);
    assert_eq!(inbox["due_for_roll_off"].as_array().unwrap().len(), 1);
    assert!(inbox["ready_until"].is_string());
    // The current partition and 3 ahead, plus the old one.
    assert_eq!(inbox["partitions"].as_array().unwrap().len(), 5);
    let table = run(&["partitions", "status"], "");
    assert!(
        table.assert_code(0).stdout.starts_with("TABLE"),
        "{table:?}"
    );

    let created = run(&["--json", "partitions", "create-ahead"], "");
    assert_eq!(
        created.assert_code(0).json()["created"],
        serde_json::json!([])
    );

    let rolled = run(&["--json", "partitions", "roll-off"], "");
    let rolled = rolled.assert_code(0).json();
    assert_eq!(rolled["busy"], false);
    assert_eq!(rolled["dropped"].as_array().unwrap().len(), 1);
    let again = run(&["partitions", "roll-off"], "");
    assert!(again
        .assert_code(0)
        .stdout
        .contains("no partition is past retention"));

    run(&["partitions", "revert", "--yes"], "").assert_code(0);
    run(&["partitions", "roll-off"], "").assert_code(1);
}

#[test]
fn roll_offs_from_two_processes_at_once_drop_each_partition_once() {
    let Some(db) = common::postgres() else { return };
    support::waybill(
        &db.url,
        &["partitions", "adopt", "--inbox-retention", "1d", "--yes"],
        "",
    )
    .assert_code(0);
    for days in 2..14 {
        old_records(&db, days, 20);
    }
    let spawn = || {
        Command::new(env!("CARGO_BIN_EXE_waybill"))
            .args([
                "--database-url",
                &db.url,
                "--json",
                "partitions",
                "roll-off",
            ])
            .env_remove("DATABASE_URL")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (first, second) = (spawn(), spawn());
    let mut dropped = HashSet::new();
    for child in [first, second] {
        let output = child.wait_with_output().unwrap();
        assert!(output.status.success(), "{output:?}");
        let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
        assert_eq!(report["busy"], false);
        for name in report["dropped"].as_array().unwrap() {
            assert!(
                dropped.insert(name.as_str().unwrap().to_owned()),
                "{name} twice"
            );
        }
    }
    assert_eq!(dropped.len(), 12);
    let left = support::waybill(&db.url, &["--json", "partitions", "status"], "");
    for table in left.assert_code(0).json()["tables"].as_array().unwrap() {
        assert_eq!(table["due_for_roll_off"], serde_json::json!([]));
    }
}

#[test]
fn status_counts_the_history_the_partitioned_layout_moved_out_of_the_queue() {
    let Some(db) = common::postgres() else { return };
    support::waybill(&db.url, &["partitions", "adopt", "--yes"], "").assert_code(0);
    // Three messages published (marking moves them to `outbox_published`), one pending.
    db.conn()
        .batch_execute(
            "INSERT INTO outbox_messages (id, topic, partition_key, message_type, content_type, payload)
             SELECT gen_random_uuid(), 'orders', 'k' || i, 'OrderPlaced', 'application/json', '{}'
             FROM generate_series(1, 4) AS i;
             UPDATE outbox_messages SET status = 1, published_at = now()
             WHERE partition_key IN ('k1', 'k2', 'k3');",
        )
        .unwrap();
    let status = support::waybill(&db.url, &["--json", "status"], "");
    let status = status.assert_code(0).json();
    let topics = status["topics"].as_array().unwrap();
    assert_eq!(topics.len(), 1, "{status}");
    assert_eq!(topics[0]["topic"], "orders");
    assert_eq!(topics[0]["pending"], 1, "{status}");
    assert_eq!(topics[0]["published"], 3, "{status}");
    assert!(topics[0]["oldest_pending_at"].is_string(), "{status}");
}

#[test]
fn partitions_on_sqlite_are_refused_as_a_postgresql_layout() {
    let dir = std::env::temp_dir().join(format!("waybill-parts-{}.db", std::process::id()));
    let url = dir.display().to_string();
    support::waybill(&url, &["migrate"], "").assert_code(0);
    let refused = support::waybill(&url, &["partitions", "status"], "");
    assert!(
        refused.assert_code(1).stderr.contains("PostgreSQL layout"),
        "{refused:?}"
    );
    let _ = std::fs::remove_file(dir);
}
