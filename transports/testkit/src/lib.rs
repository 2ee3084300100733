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
pub mod tls;

use std::time::Duration;

pub use contract::{Consume, Harness};

/// The liveness bound of loops that wait for a broker: reaching it fails the test; it is not a
/// measure of speed.
pub const PATIENCE: Duration = Duration::from_secs(60);

/// A name no other test (or earlier run) uses: `waybill-t-<prefix>-<uuid>`.
pub fn unique(prefix: &str) -> String {
    format!("waybill-t-{prefix}-{}", uuid::Uuid::new_v4().simple())
}

mod skip;

pub use skip::{servers_required, skip, variable_for};
