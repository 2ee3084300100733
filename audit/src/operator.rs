//! The operator of a run: looks at parked messages now and then and does what a person on
//! call would. An unreadable row the writer made is repaired and requeued; any other parked
//! message was parked by a broker outage (the broker never refuses an audit message), which
//! is counted as a failure, and requeued once the broker is back so the run can drain.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use waybill_outbox_core::MessageId;

use crate::db::{AuditConnection, DbPool};
use crate::Error;

/// Parked messages looked at per check.
const CHECK_LIMIT: usize = 1000;
/// How often the operator looks.
const CHECK_INTERVAL: Duration = Duration::from_millis(500);

/// What the operator did so far.
#[derive(Debug)]
pub(crate) struct Operator {
    /// Unreadable rows repaired and requeued.
    pub(crate) unreadable_requeued: u64,
    /// Messages found parked that were not unreadable: parked by a broker outage.
    pub(crate) parked_by_outage: u64,
    repaired: HashSet<MessageId>,
    next_check: Instant,
}

impl Operator {
    /// An operator that looks for the first time now.
    pub(crate) fn new() -> Self {
        Self {
            unreadable_requeued: 0,
            parked_by_outage: 0,
            repaired: HashSet::new(),
            next_check: Instant::now(),
        }
    }

    /// Looks at the parked messages when due: repairs and requeues unreadable rows; counts the
    /// others and, while `broker_up`, requeues them too.
    ///
    /// # Errors
    ///
    /// Database failures (the next check tries again).
    pub(crate) fn tend<C: AuditConnection>(
        &mut self,
        pool: &DbPool<C>,
        broker_up: bool,
    ) -> Result<(), Error> {
        let now = Instant::now();
        if now < self.next_check {
            return Ok(());
        }
        self.next_check = now + CHECK_INTERVAL;
        let mut conn = pool.get()?;
        let parked = waybill_diesel::parked_messages(&mut *conn, CHECK_LIMIT)?;
        if parked.is_empty() {
            return Ok(());
        }
        let unreadable: HashMap<String, String> = conn.unreadable_ids()?.into_iter().collect();
        for message in parked {
            let id = message.id;
            if let Some(original) = unreadable
                .get(&id.to_string())
                .filter(|_| !self.repaired.contains(&id))
            {
                // What was overwritten: an empty map, or a sequenced message's number.
                conn.set_headers(*id.as_uuid(), original)?;
                if waybill_diesel::requeue(&mut *conn, id)? {
                    log::info!("repaired and requeued unreadable message {id}");
                    self.repaired.insert(id);
                    self.unreadable_requeued += 1;
                }
            } else if broker_up && waybill_diesel::requeue(&mut *conn, id)? {
                log::warn!(
                    "message {id} of key {:?} was parked ({}); requeued",
                    message.partition_key,
                    message.last_error.as_deref().unwrap_or("no reason")
                );
                self.parked_by_outage += 1;
            }
        }
        Ok(())
    }
}
