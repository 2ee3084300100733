//! The contract every **waybill** transport must keep, written once as test suites, and the
//! helpers the transports' tests share.
//!
//! A transport's tests build a [`Harness`] (a publisher, competing consumers of one queue and
//! its dead-letter destination, all named uniquely for one test) and instantiate every
//! contract with [`contract_tests!`]: confirm-or-fail, per-key order through retries, panic and
//! poison isolation, dead-letter counts equal to what the destination holds, nothing lost while
//! the dead-letter destination is missing, and a consumer that stops when asked.
//!
//! ```
//! use waybill_testkit::{contract, memory::MemoryHarness};
//!
//! contract::retries_keep_key_order(&mut MemoryHarness::new());
//! ```
// Test support: a failed expectation is a failed test, so panicking is the point.
#![allow(clippy::expect_used, clippy::unwrap_used)]

pub mod contract;
pub mod end_to_end;
pub mod interop;
pub mod kafka;
pub mod memory;
pub mod outbox;

use std::time::Duration;

pub use contract::{Consume, Harness};

/// The liveness bound of loops that wait for a broker: reaching it fails the test; it is not a
/// measure of speed.
pub const PATIENCE: Duration = Duration::from_secs(60);

/// A name no other test (or earlier run) uses: `waybill-t-<prefix>-<uuid>`.
pub fn unique(prefix: &str) -> String {
    format!("waybill-t-{prefix}-{}", uuid::Uuid::new_v4().simple())
}

/// Whether an unreachable server skips a test (`false`) or fails it (`true`, when
/// `WAYBILL_REQUIRE_SERVERS=1`, as in CI).
pub fn servers_required() -> bool {
    std::env::var("WAYBILL_REQUIRE_SERVERS").is_ok_and(|v| v == "1")
}

/// Says why a test is skipped, naming the variable that points it at a server, or fails the
/// test when servers are required.
///
/// # Panics
///
/// When `WAYBILL_REQUIRE_SERVERS=1`.
pub fn skip(server: &str, variable: &str, why: &dyn std::fmt::Display) {
    assert!(
        !servers_required(),
        "{server} is required (WAYBILL_REQUIRE_SERVERS=1) but unreachable: {why}"
    );
    eprintln!("skipped: {server} unreachable ({why}); set {variable} to run this test");
}
