//! [`Inbox::process_in_order`]: sequenced messages applied in their key's order, each once, by
//! number instead of by id, so the inbox keeps one row per key and no retention window.

use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::time::Duration;

use chrono::Utc;
use diesel::connection::TransactionManager;
use waybill_inbox_core::{FirstMessage, InOrder, IncomingMessage};

use super::{check_name, Inbox};
use crate::sequence::{Held, SequenceMark, Stream};
use crate::Error;
use crate::InboxConnection;

/// What the mark says about a message, before anything runs.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    /// Apply it and write this mark.
    Apply(SequenceMark),
    Duplicate,
    Gap {
        expected: u64,
    },
    Regression,
}

/// Decides what to do with number `got` of epoch `epoch` given the stream's `mark`.
fn judge(mark: &SequenceMark, got: u64, epoch: &str, first: FirstMessage) -> Verdict {
    let start = |previous_epoch: String| SequenceMark {
        epoch: epoch.to_owned(),
        previous_epoch,
        epoch_start: got,
        last: got,
    };
    if mark.last == 0 {
        return if got == 1 || first == FirstMessage::StartAnywhere {
            Verdict::Apply(start(String::new()))
        } else {
            Verdict::Gap { expected: 1 }
        };
    }
    if mark.epoch == epoch {
        if got < mark.epoch_start && !mark.previous_epoch.is_empty() {
            // Numbered under this epoch before the mark adopted it, where the previous epoch's
            // messages had these numbers: the counter had gone back.
            return Verdict::Regression;
        }
        return match got {
            n if n <= mark.last => Verdict::Duplicate,
            n if n == mark.last + 1 => Verdict::Apply(SequenceMark {
                last: n,
                ..mark.clone()
            }),
            _ => Verdict::Gap {
                expected: mark.last + 1,
            },
        };
    }
    // Another epoch: the producer's counter may have gone back.
    if epoch == mark.previous_epoch && got < mark.epoch_start {
        // A late redelivery from before the epoch changed, applied back then.
        return Verdict::Duplicate;
    }
    match got {
        n if n <= mark.last => Verdict::Regression,
        n if n == mark.last + 1 => Verdict::Apply(start(mark.epoch.clone())),
        _ => Verdict::Gap {
            expected: mark.last + 1,
        },
    }
}

/// Why [`Inbox::apply_in_order`] did not apply a message.
pub(super) enum Failure<E> {
    /// The inbox refused it: no number, or a regression. Dead-letter it.
    Refused(Error),
    /// The handler's error, or a database failure: retry.
    Failed(E),
}

/// What ends the transaction without committing it.
enum Abort<E> {
    Duplicate,
    Gap { expected: u64 },
    Regression(SequenceMark),
    Failed(E),
    Panicked,
}

impl<E: From<diesel::result::Error>> From<diesel::result::Error> for Abort<E> {
    fn from(error: diesel::result::Error) -> Self {
        Self::Failed(error.into())
    }
}

impl<E: From<Error>> From<Error> for Abort<E> {
    fn from(error: Error) -> Self {
        Self::Failed(error.into())
    }
}

impl Inbox {
    /// How long [`process_in_order`](Self::process_in_order) holds a message back behind a gap
    /// (returning [`InOrder::Held`], which a consumer loop retries in place) before it gives
    /// up ([`InOrder::GapParked`]). Counted from the first time this consumer held this very
    /// message, across redeliveries and consumer restarts. Defaults to 30 seconds.
    #[must_use]
    pub fn max_gap_wait(mut self, wait: Duration) -> Self {
        self.max_gap_wait = wait;
        self
    }

    /// How [`process_in_order`](Self::process_in_order) treats the first message it sees of a
    /// key. Defaults to [`FirstMessage::MustBeFirst`].
    #[must_use]
    pub fn first_message(mut self, first: FirstMessage) -> Self {
        self.first_message = first;
        self
    }

    /// The gap wait.
    pub fn gap_wait(&self) -> Duration {
        self.max_gap_wait
    }

    /// Applies a sequenced message in its key's order, once: the message's number (see
    /// [`NewOutboxMessage::sequenced`](waybill_outbox_core::NewOutboxMessage::sequenced))
    /// against this consumer's mark of its `(source, topic, partition key)`, the last number
    /// applied.
    ///
    /// In one transaction on `conn` (a savepoint inside the caller's):
    /// - the next number: `handler` runs and the mark moves to its number, atomically with
    ///   the handler's writes: [`InOrder::Handled`]. A skip marker moves the mark without
    ///   running the handler: [`InOrder::Skipped`].
    /// - a number at or below the mark: [`InOrder::Duplicate`], forever, with no retention
    ///   window and one row per key.
    /// - a number beyond the next: nothing runs, and the gap is recorded (for `waybill inbox
    ///   gaps`, outside the rolled-back transaction): [`InOrder::Held`] while this message has
    ///   been held for less than [`max_gap_wait`](Self::max_gap_wait), then
    ///   [`InOrder::GapParked`].
    /// - the key's first message: must be number 1 unless
    ///   [`first_message`](Self::first_message) says otherwise.
    /// - a number at or below the mark under a *new* producer epoch: the producer's counter
    ///   went back (a restore, a failover); refused with [`Error::SequenceRegression`] rather
    ///   than skipped as a duplicate. A number that continues the mark under a new epoch is
    ///   applied, and the new epoch adopted.
    ///
    /// Concurrent deliveries of one key serialize on the mark's row: a consumer holding number
    /// `n + 1` while another applies `n` waits for it and then applies `n + 1`. When the
    /// handler returns `Err` or panics, everything rolls back and nothing is recorded, as in
    /// [`process_once`](Self::process_once).
    ///
    /// ```
    /// use diesel::prelude::*;
    /// use waybill_diesel::{enqueue, find_message, Inbox};
    /// use waybill_inbox_core::{InOrder, IncomingMessage};
    /// use waybill_outbox_core::NewOutboxMessage;
    ///
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let mut conn = SqliteConnection::establish(":memory:")?;
    /// waybill_diesel::run_migrations(&mut conn)?;
    /// let mut sent = Vec::new();
    /// for step in ["Placed", "Paid"] {
    ///     let msg = NewOutboxMessage::bytes("orders", "order:1", step, "text/plain", step).sequenced();
    ///     let id = conn.transaction(|conn| enqueue(conn, &msg))?;
    ///     sent.push(IncomingMessage::from(find_message(&mut conn, id)?.ok_or("gone")?));
    /// }
    /// let inbox = Inbox::new("billing").max_gap_wait(std::time::Duration::ZERO);
    /// let apply = |conn: &mut SqliteConnection, msg| {
    ///     inbox.process_in_order(conn, msg, |_| Ok::<_, waybill_diesel::Error>(()))
    /// };
    /// assert!(matches!(apply(&mut conn, &sent[1])?, InOrder::GapParked { expected: 1, got: 2 }));
    /// assert_eq!(apply(&mut conn, &sent[0])?, InOrder::Handled(()));
    /// assert_eq!(apply(&mut conn, &sent[1])?, InOrder::Handled(()));
    /// assert_eq!(apply(&mut conn, &sent[0])?, InOrder::Duplicate);
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    ///
    /// The handler's error; [`Error::NotSequenced`] for a message without a number;
    /// [`Error::SequenceRegression`] as above; [`Error::InvalidInboxKey`] or
    /// [`Error::InboxKeyWithNul`] for a bad consumer name; [`Error::HandlerTransactionAborted`]
    /// and [`Error::Database`] as for `process_once`.
    pub fn process_in_order<C, T, E, F>(
        &self,
        conn: &mut C,
        message: &IncomingMessage,
        handler: F,
    ) -> std::result::Result<InOrder<T>, E>
    where
        C: InboxConnection,
        F: FnOnce(&mut C) -> std::result::Result<T, E>,
        E: From<Error> + From<diesel::result::Error>,
    {
        self.apply_in_order(conn, message, handler)
            .map_err(|failure| match failure {
                Failure::Refused(error) => error.into(),
                Failure::Failed(error) => error,
            })
    }

    /// [`process_in_order`](Self::process_in_order), telling the inbox's refusals (a message
    /// without a number, a regression) from the handler's and the database's failures.
    pub(super) fn apply_in_order<C, T, E, F>(
        &self,
        conn: &mut C,
        message: &IncomingMessage,
        handler: F,
    ) -> std::result::Result<InOrder<T>, Failure<E>>
    where
        C: InboxConnection,
        F: FnOnce(&mut C) -> std::result::Result<T, E>,
        E: From<Error> + From<diesel::result::Error>,
    {
        check_name("consumer name", &self.consumer).map_err(Failure::Refused)?;
        let Some(position) = &message.sequence else {
            return Err(Failure::Refused(Error::NotSequenced {
                consumer: self.consumer.clone(),
                message_id: message.id,
            }));
        };
        let got = position.stamp.sequence;
        if got == 0 {
            // Numbers start at 1; 0 would read as "nothing applied yet".
            return Err(Failure::Refused(Error::NotSequenced {
                consumer: self.consumer.clone(),
                message_id: message.id,
            }));
        }
        let epoch = position.stamp.epoch.as_str();
        let stream = Stream::new(&position.source, &message.topic, &message.partition_key);
        let consumer = self.consumer.as_str();
        <C::TransactionManager as TransactionManager<C>>::begin_transaction(conn)
            .map_err(|e| Failure::Failed(e.into()))?;
        let mut panicked = None;
        let body = (|| -> std::result::Result<Option<T>, Abort<E>> {
            // The common case in one statement: the next number under the mark's epoch.
            let advanced = got > 1
                && conn.advance_sequence_mark(consumer, &stream.digest, epoch, got - 1, got)?;
            if !advanced {
                let mark = conn.lock_sequence_mark(consumer, &stream)?;
                match judge(&mark, got, epoch, self.first_message) {
                    Verdict::Apply(next) => {
                        conn.save_sequence_mark(consumer, &stream.digest, &next)?
                    }
                    Verdict::Duplicate => return Err(Abort::Duplicate),
                    Verdict::Gap { expected } => return Err(Abort::Gap { expected }),
                    Verdict::Regression => return Err(Abort::Regression(mark)),
                }
            }
            if position.skipped.is_some() {
                return Ok(None);
            }
            match catch_unwind(AssertUnwindSafe(|| handler(conn))) {
                Ok(Ok(value)) => Ok(Some(value)),
                Ok(Err(error)) => Err(Abort::Failed(error)),
                Err(payload) => {
                    panicked = Some(payload);
                    Err(Abort::Panicked)
                }
            }
        })();
        let outcome = match body {
            Ok(value) => match conn.commit_inbox_transaction() {
                Ok(true) => Ok(value),
                Ok(false) => Err(Abort::Failed(
                    Error::HandlerTransactionAborted {
                        consumer: self.consumer.clone(),
                        message_id: message.id,
                    }
                    .into(),
                )),
                Err(error) => Err(Abort::Failed(error.into())),
            },
            Err(abort) => {
                match <C::TransactionManager as TransactionManager<C>>::rollback_transaction(conn) {
                    Ok(()) | Err(diesel::result::Error::BrokenTransactionManager) => Err(abort),
                    Err(rollback_error) => Err(Abort::Failed(rollback_error.into())),
                }
            }
        };
        if let Some(payload) = panicked {
            resume_unwind(payload);
        }
        match outcome {
            Ok(Some(value)) => Ok(InOrder::Handled(value)),
            Ok(None) => Ok(InOrder::Skipped {
                reason: position.skipped.clone().unwrap_or_default(),
            }),
            Err(Abort::Duplicate) => {
                log::debug!(
                    "inbox {consumer}: message {} (number {got}) already applied",
                    message.id
                );
                Ok(InOrder::Duplicate)
            }
            Err(Abort::Gap { expected }) => self
                .hold(conn, &stream, message, expected, got)
                .map_err(|e| Failure::Failed(E::from(e))),
            Err(Abort::Regression(mark)) => {
                log::error!(
                "inbox {consumer}: sequence regression on {}/{}/{}: message {} is number {got} of \
                 epoch {epoch:?}, but {} was applied under epoch {:?}; refused",
                position.source,
                message.topic,
                message.partition_key,
                message.id,
                mark.last,
                mark.epoch
            );
                Err(Failure::Refused(Error::SequenceRegression(Box::new(
                    crate::error::Regression {
                        consumer: self.consumer.clone(),
                        producer: position.source.clone(),
                        topic: message.topic.clone(),
                        partition_key: message.partition_key.clone(),
                        message_id: message.id,
                        got,
                        epoch: epoch.to_owned(),
                        last: mark.last,
                        mark_epoch: mark.epoch,
                    },
                ))))
            }
            Err(Abort::Failed(error)) => Err(Failure::Failed(error)),
            Err(Abort::Panicked) => resume_unwind(Box::new("inbox handler panicked")),
        }
    }

    /// Records a held message and tells whether its gap wait ran out.
    fn hold<C, T>(
        &self,
        conn: &mut C,
        stream: &Stream<'_>,
        message: &IncomingMessage,
        expected: u64,
        got: u64,
    ) -> crate::Result<InOrder<T>>
    where
        C: InboxConnection,
    {
        let consumer = self.consumer.as_str();
        let now = Utc::now();
        let id = message.id.to_string();
        let held = Held {
            expected,
            got,
            message_id: &id,
            now,
        };
        let first_seen = conn.hold_sequence_gap(consumer, stream, &held)?;
        let waited = (now - first_seen).to_std().unwrap_or(Duration::ZERO);
        if first_seen == now {
            waybill_inbox_core::metrics::record_gap(consumer);
        }
        if waited >= self.max_gap_wait {
            conn.park_sequence_gap(consumer, &stream.digest)?;
            waybill_inbox_core::metrics::record_gap_parked(consumer);
            log::error!(
                "inbox {consumer}: parking message {} of {}/{}/{}: {} (held {waited:?})",
                message.id,
                stream.source,
                stream.topic,
                stream.partition_key,
                waybill_inbox_core::gap_reason(expected, got)
            );
            return Ok(InOrder::GapParked { expected, got });
        }
        log::warn!(
            "inbox {consumer}: holding message {} of {}/{}/{} back: {} (held {waited:?})",
            message.id,
            stream.source,
            stream.topic,
            stream.partition_key,
            waybill_inbox_core::gap_reason(expected, got)
        );
        Ok(InOrder::Held {
            expected,
            got,
            waited,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mark(epoch: &str, previous: &str, start: u64, last: u64) -> SequenceMark {
        SequenceMark {
            epoch: epoch.into(),
            previous_epoch: previous.into(),
            epoch_start: start,
            last,
        }
    }

    #[test]
    fn the_next_number_applies_and_anything_at_or_below_is_a_duplicate() {
        let m = mark("a", "", 1, 5);
        assert_eq!(
            judge(&m, 6, "a", FirstMessage::MustBeFirst),
            Verdict::Apply(mark("a", "", 1, 6))
        );
        assert_eq!(
            judge(&m, 5, "a", FirstMessage::MustBeFirst),
            Verdict::Duplicate
        );
        assert_eq!(
            judge(&m, 1, "a", FirstMessage::MustBeFirst),
            Verdict::Duplicate
        );
        assert_eq!(
            judge(&m, 8, "a", FirstMessage::MustBeFirst),
            Verdict::Gap { expected: 6 }
        );
    }

    #[test]
    fn a_first_message_must_be_number_one_unless_told_otherwise() {
        let empty = SequenceMark::default();
        assert_eq!(
            judge(&empty, 3, "a", FirstMessage::MustBeFirst),
            Verdict::Gap { expected: 1 }
        );
        assert_eq!(
            judge(&empty, 3, "a", FirstMessage::StartAnywhere),
            Verdict::Apply(mark("a", "", 3, 3))
        );
    }

    #[test]
    fn a_new_epoch_that_goes_back_is_a_regression_and_one_that_continues_is_adopted() {
        let m = mark("a", "", 1, 5);
        assert_eq!(
            judge(&m, 4, "b", FirstMessage::MustBeFirst),
            Verdict::Regression
        );
        assert_eq!(
            judge(&m, 5, "b", FirstMessage::MustBeFirst),
            Verdict::Regression
        );
        assert_eq!(
            judge(&m, 6, "b", FirstMessage::MustBeFirst),
            Verdict::Apply(mark("b", "a", 6, 6))
        );
        let switched = mark("b", "a", 6, 7);
        // A late redelivery of the old epoch from before the switch is a duplicate ...
        assert_eq!(
            judge(&switched, 5, "a", FirstMessage::MustBeFirst),
            Verdict::Duplicate
        );
        // ... but the old epoch numbering at or past the switch is a split brain.
        assert_eq!(
            judge(&switched, 6, "a", FirstMessage::MustBeFirst),
            Verdict::Regression
        );
        assert_eq!(
            judge(&switched, 3, "c", FirstMessage::MustBeFirst),
            Verdict::Regression
        );
    }
}
