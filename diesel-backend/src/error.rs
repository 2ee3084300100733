//! Errors of the diesel backend.

use diesel::result::{DatabaseErrorKind, Error as DieselError};
use waybill_outbox_core::{MessageId, Retryable, Status, ValidationError};

/// Everything that can go wrong in `waybill-diesel`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The message breaks a limit; the database was not touched.
    #[error("invalid outbox message {id}")]
    Invalid {
        /// The refused message.
        id: MessageId,
        /// What is wrong with it.
        #[source]
        source: ValidationError,
    },
    /// A message with this id is already in the outbox (or twice in one `enqueue_all`). On
    /// PostgreSQL the surrounding transaction is aborted and must be rolled back.
    #[error("message id {} is already in the outbox", .0.map_or_else(|| "(one of the batch)".to_owned(), |id| id.to_string()))]
    DuplicateMessageId(Option<MessageId>),
    /// `enqueue_all` needs several statements and was called outside a transaction, where
    /// it could only be partly written. Call it inside `conn.transaction(..)`.
    #[error(
        "enqueue_all of {0} messages needs a transaction; call it inside conn.transaction(..)"
    )]
    NotInTransaction(usize),
    /// A stored row could not be read back (unknown status, malformed id or headers).
    #[error("outbox row {seq} is malformed: {reason}")]
    MalformedRow {
        /// The row's `seq`.
        seq: i64,
        /// What is wrong with it.
        reason: String,
    },
    /// An inbox consumer name or dedup key is empty or longer than 255 characters (the
    /// MySQL column width); the database was not touched.
    #[error("inbox {what} must be 1 to 255 characters long, not {chars}")]
    InvalidInboxKey {
        /// `consumer name` or `dedup key`.
        what: &'static str,
        /// Its length in characters.
        chars: usize,
    },
    /// A claim's lease is outside [`RelayConfig::MIN_LEASE`](waybill_outbox_core::RelayConfig::MIN_LEASE)
    /// to [`RelayConfig::MAX_LEASE`](waybill_outbox_core::RelayConfig::MAX_LEASE); nothing was
    /// claimed.
    #[error("a lease of {0:?} is out of bounds (1 ms to 1 day)")]
    InvalidLease(std::time::Duration),
    /// A claim's batch size is 0 or above
    /// [`RelayConfig::MAX_BATCH_SIZE`](waybill_outbox_core::RelayConfig::MAX_BATCH_SIZE);
    /// nothing was claimed.
    #[error("a batch size of {0} is out of bounds (1 to 50,000)")]
    InvalidBatchSize(usize),
    /// The message is larger than one statement may be on this server (MySQL's
    /// `max_allowed_packet`); nothing was written. Raise the server's limit or lower
    /// [`Limits`](waybill_outbox_core::Limits).
    #[error(
        "message {id} needs about {bytes} bytes, more than the server's packet limit of {limit}"
    )]
    TooLargeForServer {
        /// The message.
        id: MessageId,
        /// About how many bytes its row takes in a statement.
        bytes: u64,
        /// The server's `max_allowed_packet`.
        limit: u64,
    },
    /// No message with this id is in the outbox.
    #[error("message {0} is not in the outbox")]
    MessageNotFound(MessageId),
    /// Only parked messages can be skipped; nothing was written.
    #[error("message {id} is {status:?}, not parked; only parked messages can be skipped")]
    NotParked {
        /// The message.
        id: MessageId,
        /// Its status.
        status: Status,
    },
    /// The inbox already processed a message with this id but another payload: a sender that
    /// reuses ids, or a forged message. Nothing was recorded and the handler did not run; the
    /// delivery should be dead-lettered, not retried.
    #[error(
        "inbox {consumer}: message {message_id} was already processed with a different payload"
    )]
    ConflictingDuplicate {
        /// The consumer.
        consumer: String,
        /// The reused id.
        message_id: MessageId,
    },
    /// The database refused or failed a statement; the text names the cause, and a missing
    /// table says to run the migrations.
    #[error("database error: {0}{hint}", hint = missing_table_hint(.0))]
    Database(#[from] DieselError),
    /// No pooled connection could be had (the text says why: a timeout, a refused connection).
    #[error("connection pool error: {0}")]
    Pool(#[from] r2d2::Error),
    /// The pool given to [`DieselStore::try_new`](crate::DieselStore::try_new) is too small for
    /// a relay: on PostgreSQL one connection stays listening for wake-ups and another does the
    /// work.
    #[error(
        "a relay's pool needs at least {needed} connections on this database, not {size} \
         (one stays listening for wake-ups)"
    )]
    PoolTooSmall {
        /// The pool's `max_size`.
        size: u32,
        /// The smallest size that works.
        needed: u32,
    },
    /// Running the embedded migrations failed.
    #[error("running migrations failed: {0}")]
    Migration(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// A claim could not lease these key buckets: their rows in `outbox_relay_leases` are
    /// missing (claims restore them, so they were deleted while it ran). Nothing was claimed;
    /// the next claim restores them.
    #[error("the lease rows of outbox buckets {0:?} are missing; nothing was claimed")]
    MissingLeaseRows(Vec<i16>),
    /// An inbox consumer name or dedup key contains a NUL byte, which PostgreSQL cannot store
    /// in text; refused on every backend so code moves between them. The database was not
    /// touched.
    #[error("inbox {what} must not contain a NUL byte")]
    InboxKeyWithNul {
        /// `consumer name` or `dedup key`.
        what: &'static str,
    },
    /// The inbox handler returned `Ok`, but one of its statements had failed and aborted the
    /// PostgreSQL transaction (the handler ignored that error), so nothing of it could commit.
    /// Everything was rolled back and nothing was recorded: do not acknowledge the delivery.
    #[error(
        "inbox {consumer}: the handler of message {message_id} returned Ok, but a failed \
         statement had aborted its transaction; nothing was committed"
    )]
    HandlerTransactionAborted {
        /// The consumer.
        consumer: String,
        /// The message whose handler ran.
        message_id: MessageId,
    },
    /// The partitioned layout is not adopted on this database (no `waybill_partitioning`
    /// table in the connection's search path); nothing was changed.
    #[error("the partitioned layout is not adopted here; run `waybill partitions adopt` first")]
    NotPartitioned,
    /// The partitioned layout is adopted already; nothing was changed.
    #[error("the partitioned layout is adopted already")]
    AlreadyPartitioned,
    /// A partition setting is out of bounds; nothing was changed.
    #[error("partition {what} must be {bound}, not {value:?}")]
    InvalidPartitionConfig {
        /// The setting: `width`, `retention` or `ahead`.
        what: &'static str,
        /// What it must be.
        bound: &'static str,
        /// The value given.
        value: String,
    },
    /// A roll-off detaches partitions `CONCURRENTLY`, which PostgreSQL refuses inside a
    /// transaction block; call it on a connection outside any transaction.
    #[error("a partition roll-off cannot run inside a transaction")]
    RollOffInTransaction,
    /// A sequenced message was enqueued outside a transaction: its number and its row are two
    /// statements, and a failure between them would leave a gap consumers wait on. Nothing was
    /// written. Call `enqueue` inside `conn.transaction(..)`.
    #[error("message {0} is sequenced and needs a transaction; call enqueue inside conn.transaction(..)")]
    SequencedOutsideTransaction(MessageId),
    /// `process_in_order` got a message without a sequence number (not enqueued as
    /// `sequenced`, or sent by a producer that does not number messages), or with the number 0:
    /// it cannot be put in order. Dead-letter it, or consume the topic with `process_once`.
    #[error("inbox {consumer}: message {message_id} has no sequence number; it cannot be applied in order")]
    NotSequenced {
        /// The consumer.
        consumer: String,
        /// The message.
        message_id: MessageId,
    },
    /// The producer's counter went back: a message of a new producer epoch carries a number
    /// this consumer already applied under another epoch (the producer database was restored
    /// from a backup or failed over to a replica that lagged). Applying it would skip a new
    /// message as a duplicate, so it is refused; nothing was recorded. An operator must decide
    /// (see docs/guarantees.md, "Sequenced messages").
    #[error(transparent)]
    SequenceRegression(Box<Regression>),
}

/// What [`Error::SequenceRegression`] saw.
#[derive(Debug, thiserror::Error)]
#[error(
    "inbox {consumer}: sequence regression on {producer}/{topic}/{partition_key}: message \
     {message_id} has number {got} under producer epoch {epoch:?}, but {last} was already \
     applied under epoch {mark_epoch:?} (the producer's counter went back: restored or failed \
     over?)"
)]
#[non_exhaustive]
pub struct Regression {
    /// The consumer.
    pub consumer: String,
    /// The producer's CloudEvents source.
    pub producer: String,
    /// The topic.
    pub topic: String,
    /// The partition key.
    pub partition_key: String,
    /// The refused message.
    pub message_id: MessageId,
    /// Its number.
    pub got: u64,
    /// Its epoch.
    pub epoch: String,
    /// The last number applied.
    pub last: u64,
    /// The epoch that number was applied under.
    pub mark_epoch: String,
}

/// The result type of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Retryable for Error {
    fn is_retryable(&self) -> bool {
        match self {
            Self::Pool(_) | Self::MissingLeaseRows(_) => true,
            Self::Database(DieselError::DatabaseError(kind, info)) => match kind {
                DatabaseErrorKind::SerializationFailure | DatabaseErrorKind::ClosedConnection => {
                    true
                }
                DatabaseErrorKind::Unknown => {
                    // Deadlocks, lock wait timeouts and SQLite's busy database have no kind of
                    // their own in diesel.
                    let message = info.message().to_ascii_lowercase();
                    [
                        "deadlock",
                        "lock wait timeout",
                        "database is locked",
                        "terminating connection",
                        "server closed",
                        "lost connection",
                        "gone away",
                    ]
                    .iter()
                    .any(|needle| message.contains(needle))
                }
                _ => false,
            },
            Self::Database(DieselError::BrokenTransactionManager) => true,
            _ => false,
        }
    }
}

/// What to do about a table that does not exist: the schema was never migrated (or migrated in
/// another schema or database than the one the connection uses).
fn missing_table_hint(error: &DieselError) -> &'static str {
    let DieselError::DatabaseError(_, info) = error else {
        return "";
    };
    let message = info.message();
    // PostgreSQL, SQLite and MySQL/MariaDB spell it differently and give it no error kind.
    let missing = (message.starts_with("relation ") && message.ends_with("does not exist"))
        || message.starts_with("no such table")
        || (message.starts_with("Table ") && message.ends_with("doesn't exist"));
    if missing {
        " (run `waybill migrate` or `waybill_diesel::run_migrations` on this database first)"
    } else {
        ""
    }
}

/// Maps a unique violation on the outbox id into [`Error::DuplicateMessageId`].
pub(crate) fn duplicate_or(error: DieselError, id: Option<MessageId>) -> Error {
    match &error {
        DieselError::DatabaseError(DatabaseErrorKind::UniqueViolation, info)
            if info.constraint_name().is_none_or(|c| c.contains("id_key"))
                && (info.message().contains("id") || info.constraint_name().is_some()) =>
        {
            Error::DuplicateMessageId(id)
        }
        _ => Error::Database(error),
    }
}
