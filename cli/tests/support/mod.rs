//! Runs the `waybill` binary on the databases of waybill-diesel's test harness (included as
//! `common`), and reads what `skip` left in `outbox_skipped` on each backend.
#![allow(
    dead_code,
    unreachable_pub,
    missing_docs,
    clippy::expect_used,
    clippy::unwrap_used
)]

use std::io::{Read, Write};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use diesel::prelude::*;
use waybill_diesel::OpsConnection;

/// What the suites need beyond waybill-diesel's harness.
pub trait Ops: OpsConnection + Sized {
    /// `(reason, skipped_by, attempts)` of every row in `outbox_skipped`.
    fn skipped(conn: &mut Self) -> Vec<(String, String, i64)>;
}

#[derive(QueryableByName)]
struct Skipped {
    #[diesel(sql_type = diesel::sql_types::Text)]
    reason: String,
    #[diesel(sql_type = diesel::sql_types::Text)]
    skipped_by: String,
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    attempts: i64,
}

macro_rules! ops {
    ($conn:ty, $bigint:literal) => {
        impl Ops for $conn {
            fn skipped(conn: &mut Self) -> Vec<(String, String, i64)> {
                let query = concat!(
                    "SELECT reason, skipped_by, CAST(attempts AS ",
                    $bigint,
                    ") AS attempts FROM outbox_skipped"
                );
                let rows: Vec<Skipped> = diesel::sql_query(query).load(conn).expect("skipped rows");
                rows.into_iter()
                    .map(|r| (r.reason, r.skipped_by, r.attempts))
                    .collect()
            }
        }
    };
}
ops!(SqliteConnection, "BIGINT");
ops!(PgConnection, "BIGINT");
#[cfg(feature = "mysql")]
ops!(MysqlConnection, "SIGNED");

/// A finished run of the binary.
#[derive(Debug)]
pub struct Run {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {self:?}"))
    }

    #[track_caller]
    pub fn assert_code(&self, code: i32) -> &Self {
        assert_eq!(self.code, Some(code), "{self:?}");
        self
    }
}

/// Runs `waybill --database-url <url> args...` with `stdin` fed to it.
pub fn waybill(url: &str, args: &[&str], stdin: &str) -> Run {
    let mut child = Command::new(env!("CARGO_BIN_EXE_waybill"))
        .arg("--database-url")
        .arg(url)
        .args(args)
        .env_remove("DATABASE_URL")
        .env_remove("BROKER_URL")
        .env_remove("WAYBILL_TOPICS")
        .env_remove("WAYBILL_METRICS_ADDR")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the waybill binary starts");
    let mut input = child.stdin.take().expect("stdin");
    // The binary may exit before reading (usage errors); a closed pipe is fine then.
    let _ = input.write_all(stdin.as_bytes());
    drop(input);
    let Output {
        status,
        stdout,
        stderr,
    } = child.wait_with_output().expect("waybill finishes");
    Run {
        code: status.code(),
        stdout: String::from_utf8_lossy(&stdout).into_owned(),
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
    }
}

/// Sends `signal` (e.g. `-TERM`) to a running `waybill relay` and waits, at most `deadline`,
/// for it to exit: its exit code and what it wrote to stderr (piped when it was spawned).
pub fn stop_relay(mut relay: Child, signal: &str, deadline: Duration) -> (Option<i32>, String) {
    let kill = Command::new("kill")
        .args([signal, &relay.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let started = Instant::now();
    let status = loop {
        if let Some(status) = relay.try_wait().unwrap() {
            break status;
        }
        assert!(
            started.elapsed() < deadline,
            "the relay did not stop on {signal}"
        );
        std::thread::sleep(Duration::from_millis(20)); // polling interval
    };
    let mut stderr = String::new();
    relay
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    (status.code(), stderr)
}
