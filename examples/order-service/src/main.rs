//! Two services with their own databases, glued by waybill's outbox and inbox: **orders**
//! places each order and its `OrderPlaced` event in one transaction; **billing** charges each
//! order once, however often the broker delivers it, and answers with `PaymentCaptured`, which
//! marks the order paid. The audit at the end proves every order was charged exactly once.
//!
//! Run with: `cargo run --release -p waybill-order-service`
//!
//! That is the embedded mode: two fresh SQLite files under `--data-dir`, the in-process
//! broker repeating 20% of its deliveries, and every role on a thread of one process, with
//! progress on stderr and the audit table on stdout. `report` prints the audit as JSON.
//!
//! The same one command on real servers: `--orders-db`, `--billing-db` (`postgres://...`,
//! `mysql://...` with the `mysql` feature, or a SQLite path) and `--broker` (`amqp://...`,
//! `nats://...` or `kafka://HOST:PORT`), or `ORDERS_DATABASE_URL`, `BILLING_DATABASE_URL`, `BROKER_URL`; flags win.
//! Databases are kept between runs; the table counts each run's own orders.
//!
//! One process per role, as deployed (each creates its schema on start):
//!
//! ```text
//! export ORDERS_DATABASE_URL=postgres://postgres@127.0.0.1:5432/orders
//! export BILLING_DATABASE_URL=postgres://postgres@127.0.0.1:5432/billing
//! export BROKER_URL=amqp://guest:guest@127.0.0.1:5672/%2f   # or nats://127.0.0.1:4222, kafka://127.0.0.1:19092
//! order-service relay --service orders &
//! order-service relay --service billing &
//! order-service billing &
//! order-service serve-orders --listen 127.0.0.1:8080 &
//! order-service place --count 1000 --concurrency 4   # or: curl -d '{"customer":"ada","amount_cents":1234}' localhost:8080/orders
//! order-service report
//! ```
//!
//! A killed relay's claimed messages wait `--relay-lease-secs` (30) before another relay
//! sends them; NATS redelivers a killed consumer's deliveries after `--ack-wait-secs` (30).

mod billing;
mod broker;
mod db;
mod embedded;
mod http;
mod inbox;
mod orders;
mod place;
mod report;
mod roles;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};

use crate::broker::{Broker, Timing};
use crate::db::{parse_url, AppConnection, Backend};
use crate::embedded::{open, EmbeddedOptions, Messaging, Service};

/// The example's error type: anything, with its message, across threads.
pub(crate) type Error = Box<dyn std::error::Error + Send + Sync>;

#[derive(Debug, Parser)]
#[command(name = "order-service", about = "waybill's order service example")]
struct Args {
    /// Where the SQLite files go when no database URL is given (the one-command run starts
    /// them afresh).
    #[arg(long, global = true, default_value = "data/order-service")]
    data_dir: PathBuf,
    /// The orders database: `postgres://...`, `mysql://...` (built with the `mysql` feature)
    /// or a SQLite path (`sqlite://PATH` or `PATH`). Defaults to `DATA_DIR/orders.db`.
    #[arg(long, global = true, env = "ORDERS_DATABASE_URL")]
    orders_db: Option<String>,
    /// The billing database, like `--orders-db`. Defaults to `DATA_DIR/billing.db`.
    #[arg(long, global = true, env = "BILLING_DATABASE_URL")]
    billing_db: Option<String>,
    /// The broker: `amqp://...`, `nats://...`, `kafka://HOST:PORT`, or `memory` (the in-process broker; the
    /// one-command run's default, and only there).
    #[arg(long, global = true, env = "BROKER_URL")]
    broker: Option<String>,
    /// A prefix for every exchange, queue, stream and subject, so several deployments (or
    /// tests) can share one broker.
    #[arg(long, global = true, env = "BROKER_NAMESPACE")]
    namespace: Option<String>,
    /// Seconds a relay's claim on a batch lasts: a killed relay's claimed messages wait this
    /// long before another relay publishes them. Must exceed the time to publish one batch.
    #[arg(long, global = true, default_value_t = 30)]
    relay_lease_secs: u64,
    /// Seconds NATS waits for a delivery's ack before redelivering it, as after a killed
    /// consumer (RabbitMQ redelivers as soon as the consumer's connection drops). Must exceed
    /// the time a consumer takes for one batch.
    #[arg(long, global = true, default_value_t = 30)]
    ack_wait_secs: u64,
    /// Orders the one-command run places.
    #[arg(long, default_value_t = 1000)]
    orders: u64,
    /// Threads placing them.
    #[arg(long, default_value_t = 4)]
    concurrency: usize,
    /// The fraction of deliveries the in-process broker repeats (0.0 to 1.0).
    #[arg(long, default_value_t = 0.2)]
    redeliver_fraction: f64,
    /// Seconds the one-command run waits for every order to be charged and paid.
    #[arg(long, default_value_t = 300)]
    timeout_secs: u64,
    /// Test hook: the one-command run's writer fails at this order number, to show that a failing
    /// writer ends the run at once with its error.
    #[arg(long, hide = true)]
    fail_at_order: Option<u64>,
    /// How the broker connections are secured: the flags `waybill relay` takes.
    #[command(flatten)]
    security: waybill_cli::connect::BrokerArgs,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Prints the audit of both databases as one JSON object.
    Report,
    /// Relays one service's outbox to the broker.
    Relay {
        /// Whose outbox.
        #[arg(long, value_enum)]
        service: ServiceName,
    },
    /// Billing's consumer: charges each placed order once.
    Billing,
    /// Places orders straight through the orders database.
    Place {
        /// How many.
        #[arg(long, default_value_t = 100)]
        count: u64,
        /// On how many threads.
        #[arg(long, default_value_t = 4)]
        concurrency: usize,
    },
    /// The orders service: HTTP API and the consumer that marks orders paid.
    ServeOrders {
        /// The address to listen on. The API has no authentication: keep it on loopback.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: String,
    },
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum ServiceName {
    Orders,
    Billing,
}

/// Runs `$body` with `$conn` the connection type that `$url`'s scheme names and `$parsed` the
/// URL as diesel wants it.
macro_rules! on_backend {
    ($url:expr, |$conn:ident, $parsed:ident| $body:expr) => {
        match parse_url(&$url)? {
            (Backend::Postgres, $parsed) => {
                type $conn = diesel::PgConnection;
                $body
            }
            (Backend::Sqlite, $parsed) => {
                type $conn = diesel::SqliteConnection;
                $body
            }
            #[cfg(feature = "mysql")]
            (Backend::Mysql, $parsed) => {
                type $conn = diesel::MysqlConnection;
                $body
            }
        }
    };
}

impl Args {
    fn orders_url(&self) -> String {
        self.orders_db
            .clone()
            .unwrap_or_else(|| self.data_file("orders.db"))
    }

    fn billing_url(&self) -> String {
        self.billing_db
            .clone()
            .unwrap_or_else(|| self.data_file("billing.db"))
    }

    fn broker(&self) -> Result<Option<Broker>, Error> {
        self.broker
            .as_deref()
            .map(|url| {
                let timing = Timing {
                    relay_lease: Duration::from_secs(self.relay_lease_secs),
                    ack_wait: Duration::from_secs(self.ack_wait_secs),
                };
                Broker::parse(url, self.namespace.clone(), timing, self.security.clone())
            })
            .transpose()
    }

    fn required_broker(&self) -> Result<Broker, Error> {
        self.broker()?.ok_or_else(|| {
            "this command needs --broker (or BROKER_URL): amqp://..., nats://... or kafka://..."
                .into()
        })
    }

    fn data_file(&self, name: &str) -> String {
        self.data_dir.join(name).to_string_lossy().into_owned()
    }

    /// `data_file(name)`, with any earlier run's database (and its WAL files) removed.
    fn fresh_data_file(&self, name: &str) -> Result<String, Error> {
        let path = self.data_file(name);
        for file in [path.clone(), format!("{path}-wal"), format!("{path}-shm")] {
            match std::fs::remove_file(&file) {
                Err(error) if error.kind() != std::io::ErrorKind::NotFound => {
                    return Err(format!("removing {file}: {error}").into())
                }
                _ => {}
            }
        }
        Ok(path)
    }
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let args = Args::parse();
    match run(&args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("FAILED: some order was not charged exactly once or not paid");
            ExitCode::FAILURE
        }
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::FAILURE
        }
    }
}

/// Runs the chosen command; `Ok(false)` means it ran but the audit failed.
fn run(args: &Args) -> Result<bool, Error> {
    match &args.command {
        None => {
            let messaging = match args.broker.as_deref() {
                None | Some("memory") => Messaging::InProcess {
                    redeliver_fraction: args.redeliver_fraction,
                },
                Some(_) => Messaging::Server(Box::new(args.required_broker()?)),
            };
            // The default SQLite files start afresh on every run; a database named is kept.
            let orders_url = match &args.orders_db {
                Some(url) => url.clone(),
                None => args.fresh_data_file("orders.db")?,
            };
            let billing_url = match &args.billing_db {
                Some(url) => url.clone(),
                None => args.fresh_data_file("billing.db")?,
            };
            let options = EmbeddedOptions {
                orders: args.orders,
                concurrency: args.concurrency,
                timeout: Duration::from_secs(args.timeout_secs),
                fail_at_order: args.fail_at_order,
            };
            on_backend!(orders_url, |O, orders_url| {
                on_backend!(billing_url, |B, billing_url| embedded::run::<O, B>(
                    &orders_url,
                    &billing_url,
                    &messaging,
                    &options
                ))
            })
        }
        Some(Command::Relay { service }) => {
            let broker = args.required_broker()?;
            match service {
                ServiceName::Orders => {
                    on_backend!(args.orders_url(), |C, url| roles::relay::<C>(
                        &url,
                        Service::Orders,
                        &broker
                    ))?;
                }
                ServiceName::Billing => {
                    on_backend!(args.billing_url(), |C, url| roles::relay::<C>(
                        &url,
                        Service::Billing,
                        &broker
                    ))?;
                }
            }
            Ok(true)
        }
        Some(Command::Billing) => {
            let broker = args.required_broker()?;
            on_backend!(args.billing_url(), |C, url| roles::billing::<C>(
                &url, &broker
            ))?;
            Ok(true)
        }
        Some(Command::Place { count, concurrency }) => {
            on_backend!(args.orders_url(), |C, url| roles::place::<C>(
                &url,
                *count,
                *concurrency
            ))?;
            Ok(true)
        }
        Some(Command::ServeOrders { listen }) => {
            let broker = args.broker()?;
            on_backend!(args.orders_url(), |C, url| roles::serve_orders::<C>(
                &url, listen, broker
            ))?;
            Ok(true)
        }
        Some(Command::Report) => on_backend!(args.orders_url(), |O, orders_url| {
            on_backend!(args.billing_url(), |B, billing_url| print_report::<O, B>(
                &orders_url,
                &billing_url
            ))
        }),
    }
}

fn print_report<O: AppConnection, B: AppConnection>(
    orders_url: &str,
    billing_url: &str,
) -> Result<bool, Error> {
    let orders_db = open::<O>(orders_url, 1, Service::Orders)?;
    let billing_db = open::<B>(billing_url, 1, Service::Billing)?;
    let report = report::audit(&orders_db, &billing_db)?;
    println!("{}", serde_json::to_string(&report)?);
    Ok(true)
}
