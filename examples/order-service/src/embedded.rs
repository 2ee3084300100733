//! The one-command demo: both services, both relays and both consumers on threads of one
//! process, on two SQLite files and the in-process broker that delivers some messages twice.

use std::panic::{self, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use diesel::SqliteConnection;
use waybill_diesel::{run_migrations, DieselStore};
use waybill_memory::{BrokerStats, MemoryBroker, MemoryConfig};
use waybill_outbox_core::{Relay, RelayConfig, RelayHandle};

use crate::billing::{self, BILLING_CONSUMER, PAYMENTS_TOPIC};
use crate::db::{AppConnection, DbPool};
use crate::inbox::CountingInbox;
use crate::orders::{self, ORDERS_CONSUMER, ORDERS_TOPIC};
use crate::report::{audit, Report};
use crate::{place, Error};

/// What the embedded run does.
#[derive(Clone, Debug)]
pub(crate) struct EmbeddedOptions {
    /// Where the two SQLite files go; recreated on every run.
    pub(crate) data_dir: PathBuf,
    /// How many orders to place.
    pub(crate) orders: u64,
    /// How many threads place them.
    pub(crate) concurrency: usize,
    /// The fraction of deliveries the broker repeats, as after a lost ack.
    pub(crate) redeliver_fraction: f64,
    /// How long to wait for every order to be charged and paid.
    pub(crate) timeout: Duration,
    /// Test hook: the writer fails at this order number (see [`place::place_orders`]).
    pub(crate) fail_at_order: Option<u64>,
}

/// Runs the demo, prints the audit table, and returns whether every order was charged exactly
/// once and paid.
///
/// # Errors
///
/// Setting up the databases failed, an order writer failed (returned as soon as it fails), or
/// the orders did not settle before the deadline.
pub(crate) fn run(options: &EmbeddedOptions) -> Result<bool, Error> {
    if options.data_dir.exists() {
        std::fs::remove_dir_all(&options.data_dir)?;
    }
    std::fs::create_dir_all(&options.data_dir)?;
    let path = |name: &str| options.data_dir.join(name).to_string_lossy().into_owned();
    let pool_size = u32::try_from(options.concurrency)
        .unwrap_or(u32::MAX)
        .saturating_add(4);
    let orders_db = open::<SqliteConnection>(&path("orders.db"), pool_size, Service::Orders)?;
    let billing_db = open::<SqliteConnection>(&path("billing.db"), 4, Service::Billing)?;

    let broker =
        MemoryBroker::new(MemoryConfig::default().redeliver_fraction(options.redeliver_fraction));
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let mut workers = Workers::default();
    workers.relay("orders relay", &orders_db, &broker)?;
    workers.relay("billing relay", &billing_db, &broker)?;
    workers.consume("billing consumer", &broker, ORDERS_TOPIC, &stop, {
        let db = billing_db.clone();
        move || CountingInbox::new(db, BILLING_CONSUMER, billing::charge)
    })?;
    workers.consume("orders consumer", &broker, PAYMENTS_TOPIC, &stop, {
        let db = orders_db.clone();
        move || CountingInbox::new(db, ORDERS_CONSUMER, orders::mark_paid)
    })?;
    eprintln!(
        "placing {} orders on {} threads; the broker repeats {:.0}% of its deliveries; \
         data in {}",
        options.orders,
        options.concurrency,
        options.redeliver_fraction * 100.0,
        options.data_dir.display()
    );
    let (placed_tx, placed_rx) = mpsc::channel();
    let writers = {
        let db = orders_db.clone();
        let (count, concurrency, fail_at) =
            (options.orders, options.concurrency, options.fail_at_order);
        thread::Builder::new()
            .name("order writers".into())
            .spawn(move || {
                let placed = panic::catch_unwind(AssertUnwindSafe(|| {
                    place::place_orders(&db, count, concurrency, fail_at)
                }))
                .unwrap_or_else(|_| Err("an order writer panicked".into()));
                // The receiver is gone only once the run is over and no longer listens.
                let _ = placed_tx.send(placed);
            })?
    };

    let outcome = wait_until_settled(&orders_db, &billing_db, &placed_rx, options, started);
    let elapsed = started.elapsed();
    workers.stop(&stop);
    if writers.join().is_err() {
        log::error!("the order writers' thread panicked");
    }
    let report = audit(&orders_db, &billing_db)?;
    print_audit(&report, &broker.stats(), elapsed);
    outcome?;
    Ok(report.is_settled() && report.orders == i64::try_from(options.orders)?)
}

/// Which service's tables a database gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Service {
    /// `orders`.
    Orders,
    /// `charges`.
    Billing,
}

/// Opens a pool and brings the database's schema up to date: waybill's migrations, then the
/// service's own tables.
///
/// # Errors
///
/// Connecting or migrating failed.
pub(crate) fn open<C: AppConnection>(
    url: &str,
    size: u32,
    service: Service,
) -> Result<DbPool<C>, Error> {
    let pool = C::pool(url, size)?;
    let mut conn = pool.get()?;
    // Processes starting together race to create the same tables, and diesel's migration
    // harness is not safe against that: the losers retry and then find everything in place.
    let mut attempt = 1;
    loop {
        let migrated = run_migrations(&mut *conn)
            .map_err(Error::from)
            .and_then(|()| {
                match service {
                    Service::Orders => conn.create_orders_tables()?,
                    Service::Billing => conn.create_billing_tables()?,
                }
                Ok(())
            });
        match migrated {
            Ok(()) => return Ok(pool.clone()),
            Err(error) if attempt < MIGRATION_ATTEMPTS => {
                log::info!("migrating failed (attempt {attempt}), retrying: {error}");
                attempt += 1;
                thread::sleep(Duration::from_millis(100 * u64::from(attempt)));
            }
            Err(error) => {
                return Err(format!("migrating {service:?}'s database failed: {error}").into())
            }
        }
    }
}

/// How often [`open`] tries to bring a schema up to date.
const MIGRATION_ATTEMPTS: u32 = 5;

/// How often the run checks whether everything settled.
const POLL_INTERVAL: Duration = Duration::from_millis(100);
/// How often it shows progress on stderr.
const PROGRESS_INTERVAL: Duration = Duration::from_millis(500);

/// Polls both databases until every order is placed, charged and paid, showing progress on
/// stderr at a fixed cadence. Returns at once when the writers fail.
fn wait_until_settled(
    orders_db: &DbPool<SqliteConnection>,
    billing_db: &DbPool<SqliteConnection>,
    placed: &Receiver<Result<u64, Error>>,
    options: &EmbeddedOptions,
    started: Instant,
) -> Result<(), Error> {
    let expected = i64::try_from(options.orders)?;
    let deadline = started + options.timeout;
    let mut next_progress = started + PROGRESS_INTERVAL;
    let mut writing = true;
    loop {
        let report = audit(orders_db, billing_db)?;
        if report.orders == expected && report.is_settled() {
            eprintln!("{} - settled", progress(&report, expected, started));
            return Ok(());
        }
        let now = Instant::now();
        if now >= deadline {
            return Err(format!("not settled after {:?}: {report:?}", options.timeout).into());
        }
        if now >= next_progress {
            eprintln!("{}", progress(&report, expected, started));
            next_progress += PROGRESS_INTERVAL;
        }
        // Waiting on the writers' outcome doubles as the poll's pause: a failure wakes us now.
        let pause = POLL_INTERVAL.min(deadline.saturating_duration_since(now));
        if writing {
            match placed.recv_timeout(pause) {
                Ok(Ok(_)) | Err(RecvTimeoutError::Disconnected) => writing = false,
                Ok(Err(error)) => {
                    eprintln!(
                        "{} - an order writer failed",
                        progress(&report, expected, started)
                    );
                    return Err(error);
                }
                Err(RecvTimeoutError::Timeout) => {}
            }
        } else {
            thread::sleep(pause);
        }
    }
}

/// One progress line: where the run stands.
fn progress(report: &Report, expected: i64, started: Instant) -> String {
    format!(
        "{:>6.2} s: placed {}/{expected}, charged {}, paid {}, outbox pending {}, \
         duplicates skipped {}",
        started.elapsed().as_secs_f64(),
        report.orders,
        report.charges,
        report.orders_paid,
        report.outbox_pending,
        report.inbox_duplicates
    )
}

fn print_audit(report: &Report, broker: &BrokerStats, elapsed: Duration) {
    let seconds = elapsed.as_secs_f64();
    #[allow(clippy::cast_precision_loss)] // an order count fits an f64 exactly
    let throughput = report.orders as f64 / seconds.max(f64::EPSILON);
    println!("orders placed:                 {}", report.orders);
    println!("messages published:            {}", broker.published);
    println!(
        "deliveries:                    {} ({} duplicates)",
        broker.delivered, broker.duplicated
    );
    println!("duplicates skipped by inboxes: {}", report.inbox_duplicates);
    println!("charges:                       {}", report.charges);
    println!(
        "orders charged exactly once:   {}",
        report.orders_charged_once
    );
    println!(
        "orders charged more than once: {}",
        report.orders_charged_more_than_once
    );
    println!("orders paid:                   {}", report.orders_paid);
    println!("elapsed:                       {seconds:.2} s");
    println!("throughput:                    {throughput:.0} orders/s");
}

/// The background threads: relays stopped through their handles, consumers through a flag.
#[derive(Default)]
struct Workers {
    relays: Vec<RelayHandle>,
    threads: Vec<JoinHandle<()>>,
}

impl Workers {
    fn relay(
        &mut self,
        name: &str,
        db: &DbPool<SqliteConnection>,
        broker: &MemoryBroker,
    ) -> Result<(), Error> {
        // SQLite has no NOTIFY, so an idle relay polls; a short interval keeps the demo brisk.
        let config = RelayConfig::default().poll_interval(Duration::from_millis(50));
        let mut relay = Relay::new(DieselStore::new(db.clone()), broker.publisher(), config);
        self.relays.push(relay.handle());
        self.spawn(name, move || {
            relay.run();
        })
    }

    fn consume<H, F>(
        &mut self,
        name: &str,
        broker: &MemoryBroker,
        topic: &str,
        stop: &Arc<AtomicBool>,
        handler: F,
    ) -> Result<(), Error>
    where
        H: waybill_inbox_core::DeliveryHandler,
        F: FnOnce() -> H + Send + 'static,
    {
        let mut consumer = broker.consumer(topic);
        let stop = Arc::clone(stop);
        self.spawn(name, move || {
            consumer.run(&mut handler(), &stop);
        })
    }

    fn spawn(&mut self, name: &str, work: impl FnOnce() + Send + 'static) -> Result<(), Error> {
        self.threads
            .push(thread::Builder::new().name(name.to_owned()).spawn(work)?);
        Ok(())
    }

    fn stop(self, stop: &AtomicBool) {
        stop.store(true, Ordering::SeqCst);
        for relay in &self.relays {
            relay.stop();
        }
        for thread in self.threads {
            if thread.join().is_err() {
                log::error!("a worker thread panicked");
            }
        }
    }
}
