//! Pieces the backends share: completions sorted by kind, durations, row conversion.

use std::time::Duration;

use chrono::{DateTime, Utc};
use waybill_outbox_core::{Completion, Headers, MessageId, OutboxMessage, Status};

use crate::{Error, Result};

/// Completions grouped the way the backends write them: the common outcomes in one statement
/// each, the rare per-message ones one by one.
#[derive(Debug, Default)]
pub(crate) struct Grouped<'a> {
    pub(crate) published: Vec<i64>,
    pub(crate) released: Vec<i64>,
    pub(crate) retried: Vec<(i64, Duration, &'a str)>,
    pub(crate) parked: Vec<(i64, &'a str)>,
}

impl<'a> Grouped<'a> {
    pub(crate) fn new(completions: &'a [Completion]) -> Self {
        let mut grouped = Self::default();
        for completion in completions {
            match completion {
                Completion::Published { seq } => grouped.published.push(*seq),
                Completion::Release { seq } => grouped.released.push(*seq),
                Completion::Retry { seq, delay, error } => {
                    grouped.retried.push((*seq, *delay, error))
                }
                Completion::Park { seq, reason } => grouped.parked.push((*seq, reason)),
            }
        }
        grouped
    }
}

/// A duration in whole microseconds, the precision every backend keeps.
pub(crate) fn micros(duration: Duration) -> i64 {
    i64::try_from(duration.as_micros()).unwrap_or(i64::MAX)
}

/// Errors and reasons are stored for operators; keep them to a readable size.
pub(crate) fn truncate_error(error: &str) -> &str {
    const MAX: usize = 4000;
    if error.len() <= MAX {
        return error;
    }
    let mut end = MAX;
    while !error.is_char_boundary(end) {
        end -= 1;
    }
    &error[..end]
}

/// The columns every backend reads back, already converted to Rust types.
pub(crate) struct RawRow {
    pub(crate) seq: i64,
    pub(crate) id: std::result::Result<MessageId, String>,
    pub(crate) topic: String,
    pub(crate) partition_key: String,
    pub(crate) message_type: String,
    pub(crate) content_type: String,
    pub(crate) payload: Vec<u8>,
    pub(crate) headers: std::result::Result<Headers, String>,
    pub(crate) status: i16,
    pub(crate) attempts: i32,
    pub(crate) last_error: Option<String>,
    pub(crate) available_at: DateTime<Utc>,
    pub(crate) created_at: DateTime<Utc>,
    pub(crate) published_at: Option<DateTime<Utc>>,
}

impl RawRow {
    pub(crate) fn into_message(self) -> Result<OutboxMessage> {
        let malformed = |reason: String| Error::MalformedRow {
            seq: self.seq,
            reason,
        };
        let id = self.id.clone().map_err(malformed)?;
        let headers = self.headers.clone().map_err(malformed)?;
        let status = Status::from_code(self.status).map_err(|e| malformed(e.to_string()))?;
        let mut message = OutboxMessage::new(self.seq, id, status);
        message.topic = self.topic;
        message.partition_key = self.partition_key;
        message.message_type = self.message_type;
        message.content_type = self.content_type;
        message.payload = self.payload;
        message.headers = headers;
        message.attempts = self.attempts;
        message.last_error = self.last_error;
        message.available_at = self.available_at;
        message.created_at = self.created_at;
        message.published_at = self.published_at;
        Ok(message)
    }
}

/// Headers stored as JSON text (SQLite, MySQL).
pub(crate) fn headers_from_text(text: &str) -> std::result::Result<Headers, String> {
    serde_json::from_str(text).map_err(|e| format!("headers are not a JSON string map: {e}"))
}

/// Ids stored as 16 bytes (SQLite, MySQL).
pub(crate) fn id_from_bytes(bytes: &[u8]) -> std::result::Result<MessageId, String> {
    MessageId::from_slice(bytes).map_err(|e| format!("id is not a 16-byte UUID: {e}"))
}

/// Sorts claimed rows into outbox order (RETURNING gives no order) and sets apart the rows that
/// cannot be read, with the reason, so the claim can park them instead of failing for good.
pub(crate) fn into_messages(rows: Vec<RawRow>) -> (Vec<OutboxMessage>, Vec<(i64, String)>) {
    let mut messages = Vec::with_capacity(rows.len());
    let mut malformed = Vec::new();
    for row in rows {
        let seq = row.seq;
        match row.into_message() {
            Ok(message) => messages.push(message),
            Err(error) => {
                log::error!("parking unreadable outbox row {seq}: {error}");
                malformed.push((seq, error.to_string()));
            }
        }
    }
    messages.sort_unstable_by_key(|m| m.seq);
    (messages, malformed)
}
