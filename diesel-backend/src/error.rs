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
    /// The database refused or failed a statement.
    #[error("database error")]
    Database(#[from] DieselError),
    /// No pooled connection could be had.
    #[error("connection pool error")]
    Pool(#[from] r2d2::Error),
    /// Running the embedded migrations failed.
    #[error("running migrations failed: {0}")]
    Migration(#[source] Box<dyn std::error::Error + Send + Sync>),
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
}

/// The result type of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Retryable for Error {
    fn is_retryable(&self) -> bool {
        match self {
            Self::Pool(_) => true,
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
