//! Pieces the backends share: completions sorted by kind, durations, row conversion.

use std::collections::HashSet;
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

/// Seqs per statement of a write-back: below every backend's bind-variable limit (SQLite
/// 32,766, MySQL 65,535) with room for the other binds of the statement.
#[cfg(any(feature = "sqlite", feature = "mysql"))]
pub(crate) const WRITE_BACK_CHUNK: usize = 10_000;

/// The longest span written into a date: 100 years. Longer delays (a backoff configured in
/// centuries) are capped, so no backend's date arithmetic overflows or panics.
const MAX_SPAN: Duration = Duration::from_secs(100 * 365 * 24 * 60 * 60);

/// A duration in whole microseconds, the precision every backend keeps, capped at 100 years.
pub(crate) fn micros(duration: Duration) -> i64 {
    i64::try_from(duration.min(MAX_SPAN).as_micros()).unwrap_or(i64::MAX)
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
///
/// A message of a key behind an unreadable one in the claim is held back too (neither handed
/// out nor charged an attempt; its bucket's release hands it back): once the unreadable row is
/// parked it blocks its key, and publishing the later message first would break key order
/// after an operator fixes and requeues it.
pub(crate) fn into_messages(mut rows: Vec<RawRow>) -> (Vec<OutboxMessage>, Vec<(i64, String)>) {
    rows.sort_unstable_by_key(|row| row.seq);
    let mut messages = Vec::with_capacity(rows.len());
    let mut malformed = Vec::new();
    let mut blocked: HashSet<String> = HashSet::new();
    for row in rows {
        let seq = row.seq;
        let key = row.partition_key.clone();
        match row.into_message() {
            Ok(message) if blocked.contains(&message.partition_key) => {
                log::warn!(
                    "holding back outbox row {seq}: an earlier message of its key is unreadable"
                );
            }
            Ok(message) => messages.push(message),
            Err(error) => {
                log::error!("parking unreadable outbox row {seq}: {error}");
                malformed.push((seq, error.to_string()));
                blocked.insert(key);
            }
        }
    }
    (messages, malformed)
}

/// What a claim takes from its candidates: which ones, and the buckets it leases for them.
/// (SQLite has one bucket and no choice to make.)
#[cfg(any(feature = "postgres", feature = "mysql"))]
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Choice {
    /// One flag per candidate, in the candidates' order: taken or not.
    pub(crate) keep: Vec<bool>,
    /// The buckets of the taken candidates, sorted, each once.
    pub(crate) buckets: Vec<i16>,
}

/// Picks a fair share of the free buckets for one claim. `buckets` holds the bucket of each
/// claimable message, in outbox order; with `relays` relays at work, the claim takes the
/// buckets of the oldest messages up to 1/`relays` of the buckets on offer (rounded up), so
/// the other relays always find buckets left, then up to `limit` of their messages.
#[cfg(any(feature = "postgres", feature = "mysql"))]
pub(crate) fn choose(buckets: &[i16], relays: usize, limit: usize) -> Choice {
    let mut offered: Vec<i16> = Vec::new();
    for bucket in buckets {
        if !offered.contains(bucket) {
            offered.push(*bucket);
        }
    }
    offered.truncate(offered.len().div_ceil(relays.max(1)));
    let mut taken = 0;
    let keep: Vec<bool> = buckets
        .iter()
        .map(|bucket| {
            let take = taken < limit && offered.contains(bucket);
            taken += usize::from(take);
            take
        })
        .collect();
    let mut leased: Vec<i16> = buckets
        .iter()
        .zip(&keep)
        .filter_map(|(&bucket, &take)| take.then_some(bucket))
        .collect();
    leased.sort_unstable();
    leased.dedup();
    Choice {
        keep,
        buckets: leased,
    }
}

#[cfg(all(test, any(feature = "postgres", feature = "mysql")))]
mod tests {
    use super::*;

    /// The positions (1-based, like `seq`) of the candidates a choice takes.
    fn seqs(choice: &Choice) -> Vec<i64> {
        (1..)
            .zip(&choice.keep)
            .filter_map(|(seq, &take)| take.then_some(seq))
            .collect()
    }

    #[test]
    fn a_lone_relay_takes_every_bucket_up_to_the_limit() {
        let choice = choose(&[3, 1, 3, 2, 1], 1, 4);
        assert_eq!(seqs(&choice), vec![1, 2, 3, 4]);
        assert_eq!(choice.buckets, vec![1, 2, 3]);
    }

    #[test]
    fn two_relays_take_half_of_the_buckets_on_offer_oldest_first() {
        let choice = choose(&[3, 1, 3, 2, 1, 4], 2, 10);
        assert_eq!(choice.buckets, vec![1, 3]);
        assert_eq!(seqs(&choice), vec![1, 2, 3, 5]);
    }

    #[test]
    fn a_single_bucket_is_taken_whatever_the_relay_count() {
        let choice = choose(&[7, 7, 7], 4, 2);
        assert_eq!(seqs(&choice), vec![1, 2]);
        assert_eq!(choice.buckets, vec![7]);
    }

    #[test]
    fn nothing_on_offer_takes_nothing() {
        assert_eq!(choose(&[], 2, 10), Choice::default());
    }
}

/// The full names (`<version>_<name>`) of the embedded migrations with these versions, in the
/// order they were applied.
pub(crate) fn migration_names<DB: diesel::backend::Backend>(
    source: &diesel_migrations::EmbeddedMigrations,
    applied: &[diesel::migration::MigrationVersion<'_>],
) -> Result<Vec<String>> {
    use diesel::migration::MigrationSource;
    let embedded = MigrationSource::<DB>::migrations(source).map_err(Error::Migration)?;
    Ok(applied
        .iter()
        .map(|version| {
            embedded
                .iter()
                .map(|migration| migration.name())
                .find(|name| name.version() == *version)
                .map_or_else(|| version.to_string(), |name| name.to_string())
        })
        .collect())
}

#[cfg(test)]
mod into_messages_tests {
    use super::*;

    fn row(seq: i64, key: &str, headers: std::result::Result<Headers, String>) -> RawRow {
        RawRow {
            seq,
            id: Ok(MessageId::new()),
            topic: "orders".into(),
            partition_key: key.into(),
            message_type: "Step".into(),
            content_type: "text/plain".into(),
            payload: Vec::new(),
            headers,
            status: Status::Pending.code(),
            attempts: 0,
            last_error: None,
            available_at: DateTime::UNIX_EPOCH,
            created_at: DateTime::UNIX_EPOCH,
            published_at: None,
        }
    }

    #[test]
    fn an_unreadable_row_holds_back_the_later_messages_of_its_key_only() {
        let unreadable = || Err("headers are not a JSON string map".to_owned());
        // Out of order, as RETURNING hands them over.
        let rows = vec![
            row(4, "k", Ok(Headers::new())),
            row(2, "k", unreadable()),
            row(1, "k", Ok(Headers::new())),
            row(3, "j", Ok(Headers::new())),
            row(5, "k", unreadable()),
        ];
        let (messages, malformed) = into_messages(rows);
        let seqs: Vec<i64> = messages.iter().map(|m| m.seq).collect();
        assert_eq!(seqs, vec![1, 3], "k's messages after seq 2 are held back");
        let parked: Vec<i64> = malformed.iter().map(|(seq, _)| *seq).collect();
        assert_eq!(parked, vec![2, 5], "every unreadable row is parked");
    }
}
