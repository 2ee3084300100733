//! **waybill-audit**: drives the real pipeline (writer -> outbox -> two relays -> broker ->
//! consumer -> inbox) while injecting faults on a seeded schedule, then counts what arrived:
//! lost messages, double effects and per-key order violations must all be 0.
//!
//! ```text
//! waybill-audit --quick                                  # PostgreSQL + RabbitMQ, ~1000 messages
//! waybill-audit --messages 20000 --seed 7 \
//!     --database-url postgres://postgres@127.0.0.1:5432/test --broker-url nats://127.0.0.1:4222
//! waybill-audit --database-url sqlite --broker-url memory   # SQLite + in-process broker
//! waybill-audit --quick --broker-url kafka://127.0.0.1       # PostgreSQL + a private Kafka broker
//! ```
//!
//! With a real broker, the program is the controller: it runs the writer, two relays and the
//! consumer as copies of itself (`worker ...`), SIGKILLs and restarts them, pauses a relay past
//! its lease (SIGSTOP/SIGCONT), cuts and blocks the broker through a TCP proxy, and terminates
//! the workers' PostgreSQL backends; the workers also crash themselves at the pipeline's
//! critical points. The in-process broker cannot span processes, so `memory` runs every role on
//! threads of this process (see `embedded.rs`). The last stdout line is the result as JSON; the
//! exit code is 1 when anything was lost, doubled or reordered.

mod broker;
mod controller;
mod counter;
mod db;
mod embedded;
mod kafka_broker;
mod operator;
mod pipeline;
mod proxy;
mod report;
mod worker;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

/// The audit's error type: anything, with its message, across threads.
pub(crate) type Error = Box<dyn std::error::Error + Send + Sync>;

/// The default database.
const DEFAULT_DATABASE: &str = "postgres://postgres@127.0.0.1:5432/test";
/// The default broker.
const DEFAULT_BROKER: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

#[derive(Debug, Parser)]
#[command(
    name = "waybill-audit",
    about = "waybill's correctness audit under injected faults"
)]
struct Args {
    /// A short run: a minute or two.
    #[arg(long)]
    quick: bool,
    /// Messages to write (default 20000, or 1000 with --quick).
    #[arg(long)]
    messages: Option<u64>,
    /// The seed of the fault schedule (random when not given; printed either way).
    #[arg(long)]
    seed: Option<u64>,
    /// `postgres://...`, `sqlite://PATH`, or `sqlite` for a fresh temporary file.
    #[arg(long, env = "DATABASE_URL", default_value = DEFAULT_DATABASE)]
    database_url: String,
    /// `amqp://...`, `nats://...`, `kafka://...` or `memory`. A Kafka run starts a private
    /// tansu broker advertised at the run's proxy (a client would otherwise bypass the proxy
    /// for the address the broker advertises), from `WAYBILL_KAFKA_BROKER_BIN` or where
    /// `.ci/run` installs it; the address in a `kafka://` URL is not used.
    #[arg(long, env = "BROKER_URL", default_value = DEFAULT_BROKER)]
    broker_url: String,
    /// How the broker connections are secured: the flags `waybill relay` takes. The workers
    /// reach the broker through the audit's fault proxy on 127.0.0.1, so a TLS server's
    /// certificate must name 127.0.0.1; removing the run's queues or streams at the end uses
    /// the URL alone.
    #[command(flatten)]
    security: waybill_cli::connect::BrokerArgs,
    /// Prefix of every schema, queue, stream and subject of the run (unique by default).
    #[arg(long)]
    namespace: Option<String>,
    /// Partition keys the messages are spread over.
    #[arg(long, default_value_t = 16)]
    keys: u64,
    /// Sequenced mode: the writer enqueues `.sequenced()` messages and the consumer applies
    /// them with `Inbox::process_in_order`; the checker also requires every key's effects to
    /// be its numbers 1, 2, 3, ... in order (no gap, no duplicate, no reordering).
    #[arg(long)]
    sequenced: bool,
    /// Keeps the run's schema (or SQLite file) for inspection.
    #[arg(long)]
    keep: bool,
    /// Self-test: reintroduce one bug's effect, which the audit must then report (`inbox`, the
    /// default: the consumer skips the inbox; `outage`: broker outages are charged to the
    /// messages; `panic`: a handler's panic leaves its connection inside a transaction).
    #[arg(
        long = "break",
        hide = true,
        value_enum,
        num_args = 0..=1,
        default_missing_value = "inbox"
    )]
    broken: Option<Break>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// One role of the pipeline, run by the controller.
    #[command(hide = true)]
    Worker(worker::WorkerArgs),
}

/// A worker's role.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum Role {
    /// Commits the messages.
    Writer,
    /// Relays the outbox to the broker.
    Relay,
    /// Consumes the broker into the inbox.
    Consumer,
}

impl Role {
    /// The role's name on the command line and in `application_name`.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Writer => "writer",
            Self::Relay => "relay",
            Self::Consumer => "consumer",
        }
    }
}

/// A bug the `--break` self-test reintroduces.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum Break {
    /// The consumer skips the inbox: redeliveries take effect twice.
    Inbox,
    /// The relays' publisher reports a broker outage as a failure of each message, so it is
    /// charged an attempt and parked once the attempts run out.
    Outage,
    /// A handler's panic leaves the consumer's connection inside a transaction, so what it
    /// handles next never commits.
    Panic,
}

impl Break {
    /// The value on the command line.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Inbox => "inbox",
            Self::Outage => "outage",
            Self::Panic => "panic",
        }
    }
}

/// Which database a URL names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Database {
    /// A PostgreSQL server URL.
    Postgres(String),
    /// A MySQL / MariaDB server URL (cargo feature `mysql`).
    #[cfg(feature = "mysql")]
    Mysql(String),
    /// A SQLite file; `None` for a fresh temporary one.
    Sqlite(Option<PathBuf>),
}

impl Database {
    /// The database `url` names.
    ///
    /// # Errors
    ///
    /// Unknown schemes, and `mysql://` in a build without the `mysql` feature.
    pub(crate) fn parse(url: &str) -> Result<Self, Error> {
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Ok(Self::Postgres(url.to_owned()))
        } else if url.starts_with("mysql://") {
            #[cfg(feature = "mysql")]
            return Ok(Self::Mysql(url.to_owned()));
            #[cfg(not(feature = "mysql"))]
            return Err("this build cannot audit MySQL: build with `--features mysql`".into());
        } else if url == "sqlite" {
            Ok(Self::Sqlite(None))
        } else if let Some(path) = url.strip_prefix("sqlite://") {
            Ok(Self::Sqlite(Some(PathBuf::from(path))))
        } else {
            Err(format!(
                "unsupported database URL {}: use postgres://..., mysql://..., sqlite://PATH or sqlite",
                waybill_amqp::redact(url)
            )
            .into())
        }
    }
}

/// A namespace: lowercase letters, digits and `_`, starting with a letter, at most 40
/// characters, so it is safe as a schema, queue, stream and subject name.
///
/// # Errors
///
/// Anything else.
pub(crate) fn check_namespace(namespace: &str) -> Result<(), Error> {
    let mut chars = namespace.chars();
    let valid = chars.next().is_some_and(|c| c.is_ascii_lowercase())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && namespace.len() <= 40;
    if valid {
        Ok(())
    } else {
        Err(format!(
            "namespace {namespace:?} must match [a-z][a-z0-9_]{{0,39}} (it names a schema, queues and streams)"
        )
        .into())
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    let worker = matches!(args.command, Some(Command::Worker(_)));
    // Workers crash on purpose; their warnings would drown the controller's table.
    let default_level = if worker {
        "error"
    } else {
        "error,waybill_audit=warn"
    };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(default_level))
        .init();
    let result = match args.command {
        Some(Command::Worker(worker)) => worker::run(&worker)
            .map(|()| true)
            .map_err(|error| format!("worker {}: {error}", worker.role().name()).into()),
        None => run(&args),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(error) => {
            eprintln!("error: {}", waybill_amqp::redact(&error.to_string()));
            ExitCode::from(2)
        }
    }
}

/// Runs the audit; `Ok(false)` when it found a loss, a double effect or an order violation.
fn run(args: &Args) -> Result<bool, Error> {
    let seed = args.seed.unwrap_or_else(rand::random);
    let namespace = match &args.namespace {
        Some(namespace) => namespace.clone(),
        None => format!("audit_{}", &uuid::Uuid::new_v4().simple().to_string()[..12]),
    };
    check_namespace(&namespace)?;
    let messages = args
        .messages
        .unwrap_or(if args.quick { 1000 } else { 20_000 });
    let plan = controller::Plan {
        messages,
        keys: args.keys.max(1),
        // Writing spreads over the fault window: 10 s for --quick, 100 s for 20,000.
        rate: if args.quick { 100 } else { 200 },
        seed,
        namespace,
        keep: args.keep,
        broken: args.broken,
        sequenced: args.sequenced,
    };
    let database = Database::parse(&args.database_url)?;
    let report = match broker::Kind::of(&args.broker_url)? {
        broker::Kind::Memory => embedded::run(&database, &plan)?,
        _ => controller::run(&database, &args.broker_url, &args.security, &plan)?,
    };
    report.print();
    Ok(report.passed())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespaces_are_strict_identifiers() {
        assert!(check_namespace("audit_1f2e").is_ok());
        for bad in ["", "1abc", "Audit", "a-b", "a;drop", "a.b", &"a".repeat(41)] {
            assert!(check_namespace(bad).is_err(), "{bad:?}");
        }
    }
}
