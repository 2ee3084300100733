//! One skip line for every test suite that needs a server: the testkit exports it, and the test
//! harnesses that do not depend on the testkit include this file with `#[path]` (it needs only
//! `std`), so every skipped suite says the same thing in the same words.
#![allow(dead_code, unreachable_pub)]

use std::collections::BTreeSet;
use std::io::Write;
use std::sync::{Mutex, PoisonError};

/// Whether an unreachable server skips a test (`false`) or fails it (`true`, when
/// `WAYBILL_REQUIRE_SERVERS=1`, as in CI).
pub fn servers_required() -> bool {
    std::env::var("WAYBILL_REQUIRE_SERVERS").is_ok_and(|v| v == "1")
}

/// The variable that points the tests at `server` (`PostgreSQL`, `MySQL/MariaDB`, `RabbitMQ`,
/// `NATS`, `Kafka`).
pub fn variable_for(server: &str) -> &'static str {
    match server {
        "PostgreSQL" => "PG_DATABASE_URL",
        "MySQL" | "MariaDB" | "MySQL/MariaDB" => "MYSQL_DATABASE_URL",
        "RabbitMQ" => "AMQP_ADDR",
        "NATS" => "NATS_URL",
        "Kafka" => "KAFKA_BROKERS",
        _ => "its URL",
    }
}

/// Skips the calling test because `server` is unreachable: prints, once per test binary and
/// server, past the test harness's capture,
/// `skipped: <suite> needs <server> (<why>); set <variable> (CI sets WAYBILL_REQUIRE_SERVERS=1
/// to make this a failure)`. The caller returns without testing.
///
/// # Panics
///
/// When `WAYBILL_REQUIRE_SERVERS=1`: then a missing server fails the test.
pub fn skip(server: &str, variable: &str, why: &dyn std::fmt::Display) {
    let why: Vec<String> = why
        .to_string()
        .lines()
        .map(|line| line.trim().to_owned())
        .filter(|line| !line.is_empty())
        .collect();
    let why = why.join(" ");
    assert!(
        !servers_required(),
        "{server} is required (WAYBILL_REQUIRE_SERVERS=1) but unavailable ({why}); set {variable}"
    );
    static SAID: Mutex<BTreeSet<String>> = Mutex::new(BTreeSet::new());
    let first = SAID
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .insert(server.to_owned());
    if first {
        let line = format!(
            "skipped: {} needs {server} ({why}); set {variable} (CI sets \
             WAYBILL_REQUIRE_SERVERS=1 to make this a failure)\n",
            suite()
        );
        // Straight to stderr, past the harness's capture, so a passing run still says it; in
        // one write, so the harness's own output cannot land inside the line.
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
    }
}

/// `<package>/<test binary>`, e.g. `waybill-diesel/relay`.
fn suite() -> String {
    let binary = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.file_stem().map(|s| s.to_string_lossy().into_owned()))
        .map(|stem| match stem.rsplit_once('-') {
            // Cargo names test binaries `<name>-<hash>`.
            Some((name, hash)) if hash.chars().all(|c| c.is_ascii_hexdigit()) => name.to_owned(),
            _ => stem,
        })
        .unwrap_or_else(|| "a test suite".to_owned());
    match std::env::var("CARGO_PKG_NAME") {
        Ok(package) if !package.is_empty() => format!("{package}/{binary}"),
        _ => binary,
    }
}
