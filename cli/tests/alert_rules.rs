//! The Prometheus alert rules in `docs/prometheus` are valid and behave as their unit tests say,
//! checked by the real `promtool` (skipped, naming `PROMTOOL`, when it is not installed).
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

fn rules_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/prometheus")
}

/// `PROMTOOL`, or `promtool` on the path; `None` (skipped) when it does not run.
fn promtool() -> Option<String> {
    let promtool = std::env::var("PROMTOOL").unwrap_or_else(|_| "promtool".into());
    match Command::new(&promtool).arg("--version").output() {
        Ok(output) if output.status.success() => Some(promtool),
        outcome => {
            let why = match outcome {
                Ok(output) => format!("{promtool} --version exited with {}", output.status),
                Err(error) => format!("{promtool} does not run: {error}"),
            };
            waybill_testkit::skip("promtool (Debian package prometheus)", "PROMTOOL", &why);
            None
        }
    }
}

fn run(promtool: &str, args: &[&str]) -> String {
    let output = Command::new(promtool)
        .args(args)
        .current_dir(rules_dir())
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "promtool {args:?} failed:\n{text}");
    text
}

#[test]
fn the_alert_rules_are_valid_and_pass_their_unit_tests() {
    let Some(promtool) = promtool() else { return };
    let checked = run(&promtool, &["check", "rules", "waybill-alerts.yml"]);
    assert!(checked.contains("SUCCESS: 6 rules found"), "{checked}");
    let tested = run(&promtool, &["test", "rules", "waybill-alerts.test.yml"]);
    assert!(tested.contains("SUCCESS"), "{tested}");
}
