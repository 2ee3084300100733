//! The relay's store over an r2d2 pool of diesel connections.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use diesel::r2d2::{ConnectionManager, Pool, PooledConnection, R2D2Connection};
use waybill_outbox_core::{
    Claimed, CompleteReport, Completion, LeaseToken, OutboxStore, RelayConfig, Retention,
};

use crate::{Error, OutboxConnection, Result};

type Pooled<C> = PooledConnection<ConnectionManager<C>>;

/// The [`OutboxStore`] the relay uses: each call checks out a pooled connection, does its work
/// in one short transaction and gives the connection back, so no transaction or lock is held
/// while the broker works.
///
/// Pool size: a relay uses one connection at a time for its work (at moments two with
/// [`Relay::run_pipelined`], whose idle announcements and purges run beside its database
/// thread), plus on PostgreSQL one connection it keeps listening for the enqueue trigger's
/// `NOTIFY`. [`DieselStore::try_new`] refuses a pool
/// smaller than [`DieselStore::min_pool_size`]; [`DieselStore::new`] takes it, and on
/// PostgreSQL then polls instead of listening (with a warning), so a pool of one still
/// publishes. Give each relay its own headroom when several share a pool: 2 per relay, 3 with
/// `run_pipelined` on PostgreSQL.
///
/// A checkout waits at most 1 s (or the pool's `connection_timeout`, if shorter): a relay
/// whose database is unreachable reports the failure, backs off and notices a
/// [`StopHandle::stop`](waybill_outbox_core::StopHandle::stop) within about a second.
///
/// [`Relay::run_pipelined`]: waybill_outbox_core::Relay::run_pipelined
///
/// ```
/// use diesel::r2d2::{ConnectionManager, Pool};
/// use diesel::SqliteConnection;
/// use waybill_diesel::DieselStore;
/// use waybill_outbox_core::{InMemoryPublisher, Relay, RelayConfig};
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let pool = Pool::builder().max_size(1).build(ConnectionManager::<SqliteConnection>::new(":memory:"))?;
/// waybill_diesel::run_migrations(&mut pool.get()?)?;
/// let mut relay = Relay::new(DieselStore::new(pool), InMemoryPublisher::new(), RelayConfig::default());
/// assert_eq!(relay.run_once()?.claimed, 0);
/// # Ok(())
/// # }
/// ```
pub struct DieselStore<C: R2D2Connection + 'static> {
    pool: Pool<ConnectionManager<C>>,
    listener: Mutex<Option<Pooled<C>>>,
    cannot_listen: AtomicBool,
}

impl<C: R2D2Connection + 'static> fmt::Debug for DieselStore<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DieselStore")
            .field("pool", &self.pool)
            .finish_non_exhaustive()
    }
}

/// The longest a store call waits for a pooled connection.
const CHECKOUT_WAIT: Duration = Duration::from_secs(1);

impl<C: OutboxConnection + R2D2Connection + 'static> DieselStore<C> {
    /// A store over `pool`, whatever its size.
    ///
    /// On PostgreSQL a pool of one connection cannot spare one for `LISTEN`: the store then
    /// polls (at the relay's poll interval) instead of listening, and logs a warning that says
    /// how large the pool must be. Use [`try_new`](Self::try_new) to refuse such a pool.
    pub fn new(pool: Pool<ConnectionManager<C>>) -> Self {
        let needed = Self::min_pool_size();
        let too_small = pool.max_size() < needed;
        if too_small {
            log::warn!(
                "the relay's pool holds {} connection(s), but it keeps one listening for \
                 wake-ups and needs another for its work: polling instead of listening; \
                 make the pool at least {needed} connections large",
                pool.max_size()
            );
        }
        Self {
            pool,
            listener: Mutex::new(None),
            cannot_listen: AtomicBool::new(too_small),
        }
    }

    /// A store over `pool`, refused when the pool is smaller than
    /// [`min_pool_size`](Self::min_pool_size).
    ///
    /// # Errors
    ///
    /// [`Error::PoolTooSmall`], which names the size needed.
    pub fn try_new(pool: Pool<ConnectionManager<C>>) -> Result<Self> {
        let needed = Self::min_pool_size();
        if pool.max_size() < needed {
            return Err(Error::PoolTooSmall {
                size: pool.max_size(),
                needed,
            });
        }
        Ok(Self::new(pool))
    }

    /// The smallest pool one relay over this store works with: 2 on PostgreSQL (one connection
    /// stays listening for wake-ups), 1 elsewhere.
    pub fn min_pool_size() -> u32 {
        if C::keeps_a_listening_connection() {
            2
        } else {
            1
        }
    }
}

impl<C: R2D2Connection + 'static> DieselStore<C> {
    /// The pool this store uses.
    pub fn pool(&self) -> &Pool<ConnectionManager<C>> {
        &self.pool
    }

    fn conn(&self) -> Result<Pooled<C>> {
        let wait = CHECKOUT_WAIT.min(self.pool.connection_timeout());
        Ok(self.pool.get_timeout(wait)?)
    }
}

impl<C: OutboxConnection + R2D2Connection + 'static> OutboxStore for DieselStore<C> {
    type Error = Error;

    fn claim(&self, limit: usize, lease: Duration, owner: &str) -> Result<Claimed> {
        check_claim(limit, lease)?;
        self.conn()?.claim_outbox_messages(limit, lease, owner, 0)
    }

    fn claim_ahead(&self, limit: usize, lease: Duration, owner: &str) -> Result<Claimed> {
        check_claim(limit, lease)?;
        self.conn()?.claim_outbox_messages(limit, lease, owner, 1)
    }

    fn complete(
        &self,
        token: LeaseToken,
        completions: &[Completion],
        retention: Retention,
    ) -> Result<CompleteReport> {
        if completions.is_empty() {
            return Ok(CompleteReport::default());
        }
        self.conn()?
            .complete_outbox_messages(token, completions, retention)
    }

    fn purge_published(&self, older_than: Duration, limit: usize) -> Result<u64> {
        self.conn()?.purge_published_messages(older_than, limit)
    }

    fn maintain(&self) -> Result<()> {
        self.conn()?.maintain_outbox()
    }

    fn announce_idle(&self, idle: bool) -> Result<()> {
        if self.cannot_listen.load(Ordering::Relaxed) {
            return Ok(());
        }
        self.conn()?.announce_outbox_idle(idle)
    }

    fn retire(&self, owner: &str) -> Result<()> {
        self.conn()?.retire_outbox_relay(owner)
    }

    fn poll_wakeup(&self) -> Result<bool> {
        if self.cannot_listen.load(Ordering::Relaxed) {
            return Ok(false);
        }
        let mut listener = self.listener.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(conn) = listener.as_mut() else {
            let mut conn = self.conn()?;
            if !conn.listen_for_outbox()? {
                self.cannot_listen.store(true, Ordering::Relaxed);
                return Ok(false);
            }
            *listener = Some(conn);
            // Notifications sent before LISTEN are lost: report a wake-up so the relay polls.
            return Ok(true);
        };
        conn.outbox_notified().inspect_err(|_| {
            // A broken listening connection is dropped; the next call listens afresh.
            *listener = None;
        })
    }
}

/// Refuses a claim whose lease or batch size no relay config allows: a lease of years would
/// overflow the databases' date arithmetic, a huge batch their statement limits.
fn check_claim(limit: usize, lease: Duration) -> Result<()> {
    if !(RelayConfig::MIN_LEASE..=RelayConfig::MAX_LEASE).contains(&lease) {
        return Err(Error::InvalidLease(lease));
    }
    if !(1..=RelayConfig::MAX_BATCH_SIZE).contains(&limit) {
        return Err(Error::InvalidBatchSize(limit));
    }
    Ok(())
}

impl<C: R2D2Connection + 'static> Drop for DieselStore<C> {
    fn drop(&mut self) {
        let listener = self
            .listener
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(mut conn) = listener.take() {
            // The connection goes back to the pool: stop it collecting notifications there.
            if let Err(error) =
                diesel::connection::SimpleConnection::batch_execute(&mut *conn, "UNLISTEN *")
            {
                log::warn!("UNLISTEN on the relay's listening connection failed: {error}");
            }
        }
    }
}
