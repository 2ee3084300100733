//! Interop with real Python clients: the official `cloudevents` SDK with pika, nats-py and
//! confluent-kafka read what waybill publishes, and send CloudEvents a waybill consumer
//! handles. The clients run from the script `interop/ce_interop.py` with the interpreter in
//! [`PYTHON_VARIABLE`] (`.ci/run` creates that virtualenv from
//! `.ci/interop/requirements.txt`); without it a test is skipped with one line naming the
//! variable, or fails under `WAYBILL_REQUIRE_SERVERS=1`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;

use chrono::{DateTime, SubsecRound, Utc};
use waybill_outbox_core::OutboxMessage;

/// The variable naming the Python interpreter of the interop virtualenv.
pub const PYTHON_VARIABLE: &str = "WAYBILL_INTEROP_PYTHON";

/// The interop client, when [`PYTHON_VARIABLE`] names an interpreter; otherwise the test is
/// skipped (with a line saying so) or, with `WAYBILL_REQUIRE_SERVERS=1`, failed.
pub fn client() -> Option<Client> {
    match std::env::var_os(PYTHON_VARIABLE) {
        Some(python) if !python.is_empty() => Some(Client {
            python: PathBuf::from(python),
        }),
        _ => {
            crate::skip(
                "the Python interop client",
                PYTHON_VARIABLE,
                &format!("{PYTHON_VARIABLE} is not set"),
            );
            None
        }
    }
}

/// Runs `interop/ce_interop.py` with the interop virtualenv's interpreter.
#[derive(Debug, Clone)]
pub struct Client {
    python: PathBuf,
}

impl Client {
    /// Runs `ce_interop.py <args>` and returns what it printed: one JSON line per event read.
    ///
    /// # Panics
    ///
    /// When the script cannot be started or fails (its stderr is in the message).
    pub fn run(&self, args: &[&str]) -> Vec<String> {
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("interop/ce_interop.py");
        let output = Command::new(&self.python)
            .arg(&script)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", self.python.display()));
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        assert!(
            output.status.success(),
            "ce_interop.py {} failed ({}):\n{}\n{}",
            args.join(" "),
            output.status,
            stdout,
            String::from_utf8_lossy(&output.stderr)
        );
        stdout.lines().map(str::to_owned).collect()
    }
}

/// Asserts that `lines`, the events `read-*` printed (in any order), are exactly `sent` as the
/// Python SDK parsed them: id = the outbox message id, type, `source`, specversion 1.0, time
/// (to the microsecond, Python's precision), datacontenttype, data = the JSON payload, and the
/// extensions `partitionkey`, `sequence` and `waybilltopic`. Returns the parsed lines by id, for
/// transport-specific checks.
///
/// # Panics
///
/// On any difference.
pub fn assert_parsed(
    lines: &[String],
    sent: &[OutboxMessage],
    source: &str,
) -> BTreeMap<String, serde_json::Value> {
    let parsed: BTreeMap<String, serde_json::Value> = lines
        .iter()
        .map(|line| {
            let event: serde_json::Value =
                serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
            let id = event["attributes"]["id"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            (id, event)
        })
        .collect();
    assert_eq!(parsed.len(), sent.len(), "{lines:#?}");
    for message in sent {
        let id = message.id.to_string();
        let event = parsed
            .get(&id)
            .unwrap_or_else(|| panic!("message {id} not among {lines:#?}"));
        let attributes = &event["attributes"];
        let text = |name: &str| attributes[name].as_str().map(str::to_owned);
        assert_eq!(text("specversion").as_deref(), Some("1.0"), "{event}");
        assert_eq!(text("type"), Some(message.message_type.clone()), "{event}");
        assert_eq!(text("source").as_deref(), Some(source), "{event}");
        assert_eq!(
            text("datacontenttype"),
            Some(message.content_type.clone()),
            "{event}"
        );
        assert_eq!(
            text("partitionkey"),
            Some(message.partition_key.clone()),
            "{event}"
        );
        assert_eq!(text("waybilltopic"), Some(message.topic.clone()), "{event}");
        assert_eq!(
            text("sequence"),
            Some(format!("{:019}", message.seq)),
            "{event}"
        );
        let time = text("time")
            .and_then(|t| DateTime::parse_from_rfc3339(&t).ok())
            .map(|t| t.with_timezone(&Utc));
        assert_eq!(time, Some(message.created_at.trunc_subsecs(6)), "{event}");
        let payload: serde_json::Value =
            serde_json::from_slice(&message.payload).expect("a JSON payload");
        assert_eq!(event["data"], payload, "{event}");
    }
    parsed
}
