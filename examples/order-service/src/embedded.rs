//! The one-command run: both services, both relays and both consumers on threads of one
//! process. By default on two fresh SQLite files and the in-process broker that delivers some
//! messages twice; with `--orders-db`, `--billing-db` and `--broker`, on real servers.

use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use waybill_diesel::{run_migrations, DieselStore, IncomingMessage};
use waybill_inbox_core::{DeliveryHandler, Disposition};
use waybill_memory::{MemoryBroker, MemoryConfig};
use waybill_outbox_core::{Relay, RelayConfig, RelayHandle, RelayReport, StopHandle};

use crate::billing::{self, BILLING_CONSUMER, PAYMENTS_TOPIC};
use crate::broker::Broker;
use crate::db::{AppConnection, DbPool};
use crate::inbox::CountingInbox;
use crate::orders::{self, ORDERS_CONSUMER, ORDERS_TOPIC};
use crate::report::{audit, Report};
use crate::{place, Error};

/// What the one-command run does.
#[derive(Clone, Debug)]
pub(crate) struct EmbeddedOptions {
    /// How many orders to place.
    pub(crate) orders: u64,
    /// How many threads place them.
    pub(crate) concurrency: usize,
    /// How long to wait for every order to be charged and paid.
    pub(crate) timeout: Duration,
    /// Test hook: the writer fails at this order number (see [`place::place_orders`]).
    pub(crate) fail_at_order: Option<u64>,
}

/// The broker the one-command run's relays publish to and its consumers read from.
#[derive(Debug)]
pub(crate) enum Messaging {
    /// The in-process broker, repeating this fraction of its deliveries.
    InProcess {
        /// The fraction of deliveries repeated, as after a lost ack.
        redeliver_fraction: f64,
    },
    /// RabbitMQ or NATS.
    Server(Box<Broker>),
}

/// What happened on a background thread, as the waiting loop hears it.
enum Event {
    /// The writers are done: how many orders they placed, or why they stopped.
    Placed(Result<u64, Error>),
    /// A relay or consumer stopped with an error.
    WorkerFailed(String, Error),
}

/// Runs both services, both relays and both consumers on threads of one process, places the
/// orders, prints the audit table, and returns whether every order was charged exactly once
/// and paid. Databases that already hold orders are fine: the table counts this run's.
///
/// # Errors
///
/// Setting up the databases or the broker failed, an order writer or a worker failed
/// (returned as soon as it fails), or the orders did not settle before the deadline.
pub(crate) fn run<O: AppConnection, B: AppConnection>(
    orders_url: &str,
    billing_url: &str,
    messaging: &Messaging,
    options: &EmbeddedOptions,
) -> Result<bool, Error> {
    let pool_size = u32::try_from(options.concurrency)
        .unwrap_or(u32::MAX)
        .saturating_add(4);
    let orders_db = open::<O>(orders_url, pool_size, Service::Orders)?;
    let billing_db = open::<B>(billing_url, 4, Service::Billing)?;
    let before = audit(&orders_db, &billing_db)?;
    eprintln!(
        "placing {} orders on {} threads; broker: {}",
        options.orders,
        options.concurrency,
        match messaging {
            Messaging::InProcess { redeliver_fraction } => format!(
                "in-process, repeating {:.0}% of its deliveries",
                redeliver_fraction * 100.0
            ),
            Messaging::Server(broker) => broker.to_string(),
        }
    );

    let in_process;
    let transport = match messaging {
        Messaging::InProcess { redeliver_fraction } => {
            in_process =
                MemoryBroker::new(MemoryConfig::default().redeliver_fraction(*redeliver_fraction));
            Transport::Memory(&in_process)
        }
        Messaging::Server(broker) => Transport::Server(broker),
    };
    let (events, heard) = mpsc::channel();
    let started = Instant::now();
    let mut workers = Workers::new(events.clone());
    workers.relay("orders relay", &orders_db, transport)?;
    workers.relay("billing relay", &billing_db, transport)?;
    workers.consume(
        "billing consumer",
        transport,
        ORDERS_TOPIC,
        BILLING_CONSUMER,
        {
            let db = billing_db.clone();
            move || CountingInbox::new(db, BILLING_CONSUMER, billing::charge)
        },
    )?;
    workers.consume(
        "orders consumer",
        transport,
        PAYMENTS_TOPIC,
        ORDERS_CONSUMER,
        {
            let db = orders_db.clone();
            move || CountingInbox::new(db, ORDERS_CONSUMER, orders::mark_paid)
        },
    )?;
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
                let _ = events.send(Event::Placed(placed));
            })?
    };

    let expected = before.orders + i64::try_from(options.orders)?;
    let outcome = wait_until_settled(&orders_db, &billing_db, &heard, &before, options, started);
    let elapsed = started.elapsed();
    let totals = workers.stop();
    if writers.join().is_err() {
        log::error!("the order writers' thread panicked");
    }
    let now = audit(&orders_db, &billing_db)?;
    let traffic = match transport {
        Transport::Memory(broker) => {
            let stats = broker.stats();
            Traffic {
                published: stats.published,
                delivered: stats.delivered,
                duplicated: stats.duplicated,
            }
        }
        Transport::Server(_) => Traffic {
            published: totals.published,
            delivered: totals.delivered,
            duplicated: u64::try_from(now.inbox_duplicates - before.inbox_duplicates)?,
        },
    };
    print_audit(&now.since(&before), &traffic, elapsed);
    outcome?;
    Ok(now.is_settled() && now.orders == expected)
}

/// What went through the broker during the run.
#[derive(Clone, Copy, Debug, Default)]
struct Traffic {
    /// Messages the broker confirmed.
    published: u64,
    /// Deliveries to the consumers, repeats included.
    delivered: u64,
    /// Repeated deliveries.
    duplicated: u64,
}

/// A broker the run's workers use.
#[derive(Clone, Copy, Debug)]
enum Transport<'a> {
    Memory(&'a MemoryBroker),
    Server(&'a Broker),
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
            .and_then(|_applied| {
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

/// Polls both databases until the run's orders are placed, charged and paid, showing this
/// run's progress (since `before`) on stderr at a fixed cadence. Returns at once when the
/// writers or a worker fail.
fn wait_until_settled<O: AppConnection, B: AppConnection>(
    orders_db: &DbPool<O>,
    billing_db: &DbPool<B>,
    heard: &Receiver<Event>,
    before: &Report,
    options: &EmbeddedOptions,
    started: Instant,
) -> Result<(), Error> {
    let deadline = started + options.timeout;
    let mut next_progress = started + PROGRESS_INTERVAL;
    let expected = i64::try_from(options.orders)?;
    loop {
        let now_total = audit(orders_db, billing_db)?;
        let settled = now_total.is_settled();
        let report = now_total.since(before);
        if report.orders == expected && settled {
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
        // Waiting for news doubles as the poll's pause: a failure wakes us at once.
        match heard.recv_timeout(POLL_INTERVAL.min(deadline.saturating_duration_since(now))) {
            Ok(Event::Placed(Err(error))) => {
                eprintln!(
                    "{} - an order writer failed",
                    progress(&report, expected, started)
                );
                return Err(error);
            }
            Ok(Event::WorkerFailed(name, error)) => {
                eprintln!(
                    "{} - the {name} failed",
                    progress(&report, expected, started)
                );
                return Err(format!("the {name} failed: {error}").into());
            }
            Ok(Event::Placed(Ok(_))) | Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => thread::sleep(POLL_INTERVAL),
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

fn print_audit(report: &Report, traffic: &Traffic, elapsed: Duration) {
    let seconds = elapsed.as_secs_f64();
    #[allow(clippy::cast_precision_loss)] // an order count fits an f64 exactly
    let throughput = report.orders as f64 / seconds.max(f64::EPSILON);
    println!("orders placed:                 {}", report.orders);
    println!("messages published:            {}", traffic.published);
    println!(
        "deliveries:                    {} ({} duplicates)",
        traffic.delivered, traffic.duplicated
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

/// The background threads: relays stopped through their handles, consumers through one
/// [`StopHandle`].
/// Each reports a failure on `events` as soon as it happens.
struct Workers {
    events: Sender<Event>,
    /// Stops every consumer.
    stop: StopHandle,
    relays: Vec<RelayHandle>,
    threads: Vec<JoinHandle<Traffic>>,
    delivered: Arc<AtomicU64>,
}

impl Workers {
    fn new(events: Sender<Event>) -> Self {
        Self {
            events,
            stop: StopHandle::new(),
            relays: Vec::new(),
            threads: Vec::new(),
            delivered: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Starts a relay of `db`'s outbox; returns once it runs, or with why it could not start.
    fn relay<C: AppConnection>(
        &mut self,
        name: &str,
        db: &DbPool<C>,
        transport: Transport<'_>,
    ) -> Result<(), Error> {
        let (started, handle) = mpsc::channel();
        let db = db.clone();
        let work: Box<dyn FnOnce() -> Result<RelayReport, Error> + Send> = match transport {
            Transport::Memory(broker) => {
                // An idle relay polls (SQLite has no NOTIFY); a short interval keeps it brisk.
                let config = RelayConfig::default().poll_interval(Duration::from_millis(50));
                let mut relay = Relay::new(DieselStore::new(db), broker.publisher(), config);
                let _ = started.send(relay.handle());
                Box::new(move || Ok(relay.run()))
            }
            Transport::Server(broker) => {
                let broker = broker.clone();
                Box::new(move || {
                    broker.run_relay(db, |handle| {
                        let _ = started.send(handle);
                    })
                })
            }
        };
        let thread = self.spawn(name, move || {
            work().map(|report| Traffic {
                published: report.published,
                ..Traffic::default()
            })
        })?;
        match handle.recv() {
            Ok(handle) => {
                self.relays.push(handle);
                self.threads.push(thread);
                Ok(())
            }
            // It stopped before it ran; its error is on the events channel too.
            Err(_) => Err(format!("the {name} could not start").into()),
        }
    }

    /// Starts `consumer`'s consumer of `topic`, with the handler `handler` makes.
    fn consume<H, F>(
        &mut self,
        name: &str,
        transport: Transport<'_>,
        topic: &str,
        consumer: &str,
        handler: F,
    ) -> Result<(), Error>
    where
        H: DeliveryHandler,
        F: FnOnce() -> H + Send + 'static,
    {
        let stop = self.stop.clone();
        let delivered = Arc::clone(&self.delivered);
        let work: Box<dyn FnOnce() -> Result<(), Error> + Send> = match transport {
            Transport::Memory(broker) => {
                let mut consumer = broker.consumer(topic);
                Box::new(move || {
                    consumer.run(&mut handler(), &stop);
                    Ok(())
                })
            }
            Transport::Server(broker) => {
                let (broker, topic, consumer) =
                    (broker.clone(), topic.to_owned(), consumer.to_owned());
                Box::new(move || {
                    let mut counted = Counted {
                        inner: handler(),
                        delivered,
                    };
                    broker.consume(&topic, &consumer, &mut counted, &stop)
                })
            }
        };
        let thread = self.spawn(name, move || work().map(|()| Traffic::default()))?;
        self.threads.push(thread);
        Ok(())
    }

    /// Runs `work` on a thread named `name`; its error goes on the events channel.
    fn spawn(
        &self,
        name: &str,
        work: impl FnOnce() -> Result<Traffic, Error> + Send + 'static,
    ) -> Result<JoinHandle<Traffic>, Error> {
        let events = self.events.clone();
        let owned = name.to_owned();
        Ok(thread::Builder::new()
            .name(owned.clone())
            .spawn(move || match work() {
                Ok(traffic) => traffic,
                Err(error) => {
                    log::error!("the {owned} failed: {error}");
                    let _ = events.send(Event::WorkerFailed(owned, error));
                    Traffic::default()
                }
            })?)
    }

    /// Stops every worker and returns what the relays published and the consumers received.
    fn stop(self) -> Traffic {
        self.stop.stop();
        for relay in &self.relays {
            relay.stop();
        }
        let mut published = 0;
        for thread in self.threads {
            match thread.join() {
                Ok(traffic) => published += traffic.published,
                Err(_) => log::error!("a worker thread panicked"),
            }
        }
        Traffic {
            published,
            delivered: self.delivered.load(Ordering::SeqCst),
            duplicated: 0,
        }
    }
}

/// Counts the deliveries that reach a handler: a real broker keeps no such count for us.
struct Counted<H> {
    inner: H,
    delivered: Arc<AtomicU64>,
}

impl<H: DeliveryHandler> DeliveryHandler for Counted<H> {
    fn handle(&mut self, message: &IncomingMessage) -> Disposition {
        self.delivered.fetch_add(1, Ordering::Relaxed);
        self.inner.handle(message)
    }
}
