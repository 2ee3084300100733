#![allow(clippy::expect_used, clippy::unwrap_used)]
//! The one-command embedded run, end to end, as a user runs it.

mod common;

use common::order_service;

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

    let line = |label: &str| -> i64 {
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
    };
    assert_eq!(line("orders placed:"), 50);
    assert_eq!(line("charges:"), 50);
    assert_eq!(line("orders charged exactly once:"), 50);
    assert_eq!(line("orders charged more than once:"), 0);
    assert_eq!(line("orders paid:"), 50);
    assert!(line("duplicates skipped by inboxes:") > 0, "{stdout}");
    assert!(stdout.contains("throughput:"), "{stdout}");

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
