//! `waybill-audit worker ROLE ...`: one role of the pipeline in its own process, so the
//! controller's SIGKILL, SIGSTOP and SIGCONT hit a real process.

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use diesel::{PgConnection, SqliteConnection};
use waybill_diesel::DieselStore;
use waybill_outbox_core::{Relay, StopHandle};

use crate::broker::Broker;
use crate::counter::Counter;
use crate::db::AuditConnection;
use crate::pipeline::{
    quiet_injected_panics, relay_config, AuditHandler, CountingPublisher, CrashMode, CrashPoints,
    HandlerMode, WritePlan,
};
use crate::{Break, Database, Error, Role};

/// The variable that hands a worker its database URL.
pub(crate) const DATABASE_URL_ENV: &str = "WAYBILL_AUDIT_WORKER_DATABASE_URL";
/// The variable that hands a worker its broker URL.
pub(crate) const BROKER_URL_ENV: &str = "WAYBILL_AUDIT_WORKER_BROKER_URL";

/// A worker's command line, written by the controller.
#[derive(Debug, clap::Args)]
pub(crate) struct WorkerArgs {
    /// The role.
    #[arg(value_enum)]
    role: Role,
    /// The database, as the controller prepared it (schema and `application_name` set). In
    /// the environment, not on the command line, so `ps` shows no password.
    #[arg(long, env = DATABASE_URL_ENV)]
    database_url: String,
    /// The broker, usually through the controller's fault proxy; in the environment too.
    #[arg(long, env = BROKER_URL_ENV)]
    broker_url: String,
    /// The run's namespace.
    #[arg(long)]
    namespace: String,
    /// The broker's TLS and credential flags, as the controller was given them.
    #[command(flatten)]
    security: waybill_cli::connect::BrokerArgs,
    /// Where the worker appends its event counts.
    #[arg(long)]
    events_dir: PathBuf,
    /// Seeds this incarnation's crash points.
    #[arg(long)]
    seed: u64,
    /// How likely each crash point fires.
    #[arg(long, default_value_t = 0.0)]
    crash_probability: f64,
    /// The bug the audit's self-test reintroduces, if any.
    #[arg(long = "break", value_enum)]
    broken: Option<Break>,
    /// The writer's total.
    #[arg(long, default_value_t = 0)]
    messages: u64,
    /// The writer's keys.
    #[arg(long, default_value_t = 1)]
    keys: u64,
    /// The writer's pace, messages per second.
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// Sequenced mode: the writer numbers messages, the consumer applies them in order.
    #[arg(long)]
    sequenced: bool,
}

impl WorkerArgs {
    /// The worker's role.
    pub(crate) fn role(&self) -> Role {
        self.role
    }
}

/// Runs the role until the controller ends the process (the writer ends when done).
///
/// # Errors
///
/// A database or broker that cannot be reached at start; the controller restarts the worker.
pub(crate) fn run(args: &WorkerArgs) -> Result<(), Error> {
    match Database::parse(&args.database_url)? {
        Database::Postgres(url) => run_on::<PgConnection>(&url, args),
        #[cfg(feature = "mysql")]
        Database::Mysql(url) => run_on::<diesel::MysqlConnection>(&url, args),
        Database::Sqlite(Some(path)) => run_on::<SqliteConnection>(&path.to_string_lossy(), args),
        Database::Sqlite(None) => Err("a worker needs the controller's SQLite path".into()),
    }
}

fn run_on<C: AuditConnection>(url: &str, args: &WorkerArgs) -> Result<(), Error> {
    let pool = C::pool(url, 2)?;
    let counter = Counter::create(&args.events_dir, args.role.name())?;
    let crashes = Arc::new(CrashPoints::new(
        args.seed,
        args.crash_probability,
        CrashMode::Abort,
    ));
    let broker = Broker::new(&args.broker_url, &args.namespace, &args.security)?;
    let stop = AtomicBool::new(false);
    match args.role {
        Role::Writer => {
            let plan = WritePlan {
                messages: args.messages,
                keys: args.keys,
                rate: args.rate,
                sequenced: args.sequenced,
            };
            crate::pipeline::write(&pool, plan, &stop)?;
        }
        Role::Relay => {
            let publisher = CountingPublisher::new(
                broker.publisher()?,
                counter,
                crashes,
                Arc::new(AtomicBool::new(false)),
            )
            .charging_outages(args.broken == Some(Break::Outage));
            let owner = format!("{}-relay-{}", args.namespace, std::process::id());
            Relay::new(DieselStore::new(pool), publisher, relay_config(&owner)).run_pipelined();
        }
        Role::Consumer => {
            quiet_injected_panics();
            let mode = HandlerMode {
                without_inbox: args.broken == Some(Break::Inbox),
                leak_on_panic: args.broken == Some(Break::Panic),
                sequenced: args.sequenced,
            };
            let mut handler = AuditHandler::new(pool, counter, crashes, mode, args.seed);
            broker.consume(&mut handler, &StopHandle::new())?;
        }
    }
    Ok(())
}
