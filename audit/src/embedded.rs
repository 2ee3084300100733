//! The in-process run: the in-process broker cannot span processes, so the writer, two relays
//! and the consumer run on threads of this process. Crashes are in-thread: a relay's crash
//! point panics, which drops the relay mid-step (claimed, or published but not marked), and a
//! new relay takes its place. "Pausing past the lease" stalls a relay between its claim and its
//! publish; a broker outage disconnects the broker; lost acknowledgements (the consumer dying
//! between commit and ack) are the broker's redeliveries of 10% of acknowledged deliveries.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use diesel::{PgConnection, SqliteConnection};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use waybill_diesel::DieselStore;
use waybill_memory::{MemoryBroker, MemoryConfig};
use waybill_outbox_core::{Relay, RelayHandle, StopHandle};

use crate::controller::{Drain, Plan, Target};
use crate::counter::{self, Counter};
use crate::db::{self, AuditConnection, DbPool};
use crate::operator::Operator;
use crate::pipeline::{
    quiet_injected_panics, relay_config, write, AuditHandler, CountingPublisher, CrashMode,
    CrashPoints, HandlerMode, WritePlan, TOPIC,
};
use crate::report::{Faults, Report};
use crate::{Break, Database, Error};

/// Runs the audit on threads with the in-process broker.
///
/// # Errors
///
/// The database could not be set up.
pub(crate) fn run(database: &Database, plan: &Plan) -> Result<Report, Error> {
    let started = Instant::now();
    let target = Target::create(database, &plan.namespace)?;
    let result = match database {
        Database::Postgres(_) => run_on::<PgConnection>(&target, plan, started),
        #[cfg(feature = "mysql")]
        Database::Mysql(_) => run_on::<diesel::MysqlConnection>(&target, plan, started),
        Database::Sqlite(_) => run_on::<SqliteConnection>(&target, plan, started),
    };
    if !plan.keep {
        target.remove();
    }
    result
}

/// A relay thread and what the schedule needs to reach it.
struct RelayThread {
    handle: RelayHandle,
    thread: JoinHandle<()>,
    stall: Arc<AtomicBool>,
}

/// What every relay incarnation is built from.
struct RelayParts<C: AuditConnection> {
    pool: DbPool<C>,
    broker: MemoryBroker,
    counter: Counter,
    namespace: String,
    seed: u64,
    charge_outages: bool,
}

impl<C: AuditConnection> RelayParts<C> {
    fn start(&self, incarnation: u64) -> Result<RelayThread, Error> {
        let stall = Arc::new(AtomicBool::new(false));
        let crashes = Arc::new(CrashPoints::new(
            self.seed.wrapping_add(incarnation),
            0.02,
            CrashMode::Panic,
        ));
        let publisher = CountingPublisher::new(
            self.broker.publisher(),
            self.counter.clone(),
            crashes,
            Arc::clone(&stall),
        )
        .charging_outages(self.charge_outages);
        let owner = format!("{}-relay-{incarnation}", self.namespace);
        let mut relay = Relay::new(
            DieselStore::new(self.pool.clone()),
            publisher,
            relay_config(&owner),
        );
        let handle = relay.handle();
        let thread = thread::Builder::new().name(owner).spawn(move || {
            let totals = relay.run();
            log::debug!("relay stopped: {totals:?}");
        })?;
        Ok(RelayThread {
            handle,
            thread,
            stall,
        })
    }
}

fn run_on<C: AuditConnection>(
    target: &Target,
    plan: &Plan,
    started: Instant,
) -> Result<Report, Error> {
    quiet_injected_panics();
    let pool = C::pool(&target.pool_url(), 8)?;
    db::prepare(&mut *pool.get()?)?;
    let broker = MemoryBroker::new(
        MemoryConfig::default()
            .redeliver_fraction(0.1)
            .seed(plan.seed),
    );
    let events = std::env::temp_dir().join(format!("{}-events", plan.namespace));
    let counter = Counter::create(&events, "embedded")?;
    let stop = Arc::new(AtomicBool::new(false));
    let consumer_stop = StopHandle::new();

    let writer = {
        let (pool, stop) = (pool.clone(), Arc::clone(&stop));
        let write_plan = WritePlan {
            messages: plan.messages,
            keys: plan.keys,
            rate: plan.rate,
            sequenced: plan.sequenced,
        };
        thread::Builder::new()
            .name("audit-writer".into())
            .spawn(move || write(&pool, write_plan, &stop))?
    };
    let consumer = {
        let handler = AuditHandler::new(
            pool.clone(),
            counter.clone(),
            Arc::new(CrashPoints::new(plan.seed, 0.0, CrashMode::Panic)),
            HandlerMode {
                without_inbox: plan.broken == Some(Break::Inbox),
                leak_on_panic: plan.broken == Some(Break::Panic),
                sequenced: plan.sequenced,
            },
            plan.seed,
        );
        let (mut consumer, stop) = (broker.consumer(TOPIC), consumer_stop.clone());
        thread::Builder::new()
            .name("audit-consumer".into())
            .spawn(move || {
                let mut handler = handler;
                let totals = consumer.run(&mut handler, &stop);
                log::debug!("consumer stopped: {totals:?}");
            })?
    };
    let parts = RelayParts {
        pool: pool.clone(),
        broker: broker.clone(),
        counter,
        namespace: plan.namespace.clone(),
        seed: plan.seed,
        charge_outages: plan.broken == Some(Break::Outage),
    };
    let mut incarnations = 0;
    let mut relays = Vec::new();
    for _ in 0..2 {
        incarnations += 1;
        relays.push(parts.start(incarnations)?);
    }

    let mut rng = StdRng::seed_from_u64(plan.seed);
    let mut faults = Faults::default();
    let mut next_fault = Instant::now() + Duration::from_secs(1);
    let mut next_long_outage = Instant::now() + Duration::from_secs(2);
    let mut broker_back: Option<Instant> = None;
    let mut drain: Option<Drain> = None;
    let mut operator = Operator::new();
    loop {
        if let Err(error) = operator.tend(&pool, broker_back.is_none()) {
            log::warn!("the operator's check failed: {error}");
        }
        for relay in &mut relays {
            if relay.thread.is_finished() {
                faults.worker_crashes += 1;
                incarnations += 1;
                *relay = parts.start(incarnations)?;
            }
        }
        let now = Instant::now();
        if broker_back.is_some_and(|at| at <= now) {
            broker.reconnect();
            broker_back = None;
        }
        let writing = !writer.is_finished();
        if writing && now >= next_fault {
            if rng.random_bool(0.5) {
                relays[rng.random_range(0..relays.len())]
                    .stall
                    .store(true, Ordering::SeqCst);
                faults.relay_pauses += 1;
            } else if broker_back.is_none() {
                broker.disconnect();
                faults.broker_outages += 1;
                broker_back = Some(now + Duration::from_millis(rng.random_range(500..2000)));
            }
            next_fault = now + Duration::from_millis(rng.random_range(300..1200));
        }
        if writing && now >= next_long_outage {
            // Publishing to the in-process broker fails at once: the budget is the backoffs.
            let down = Plan::long_outage(&mut rng, Duration::ZERO);
            broker.disconnect();
            faults.outages_beyond_budget += 1;
            let until = now + down;
            broker_back = Some(broker_back.map_or(until, |back| back.max(until)));
            next_long_outage = until + Plan::long_outage_gap(&mut rng);
        }
        if !writing && broker_back.is_none() {
            let drain = drain.get_or_insert_with(|| Drain::new(plan.drain_timeout()));
            if drain.over(&pool)? {
                break;
            }
        }
        thread::sleep(Duration::from_millis(50));
    }
    for relay in &relays {
        relay.handle.stop();
    }
    stop.store(true, Ordering::SeqCst);
    consumer_stop.stop();
    for relay in relays {
        // A relay that crashed at the very end has nothing left to report.
        let _ = relay.thread.join();
    }
    let _ = consumer.join();
    writer.join().map_err(|_| "the writer thread panicked")??;
    let counts = counter::totals(&events)?;
    if !plan.keep {
        // Only our own files are in there.
        let _ = std::fs::remove_dir_all(&events);
    }
    let setup = match target {
        Target::Postgres { .. } => "PostgreSQL + in-process broker (threads)",
        #[cfg(feature = "mysql")]
        Target::Mysql { .. } => "MySQL / MariaDB + in-process broker (threads)",
        Target::Sqlite { .. } => "SQLite + in-process broker (threads)",
    };
    Ok(Report::new(
        setup.to_owned(),
        db::outcome(&mut *pool.get()?)?,
        &counts,
        plan.seed,
        faults,
        &operator,
        started.elapsed(),
    )
    .sequenced(plan.sequenced))
}
