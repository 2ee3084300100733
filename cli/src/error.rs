//! Errors of the binary.

/// Everything a command can fail with.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CliError {
    /// No `--database-url` / `DATABASE_URL`.
    #[error("no database: pass --database-url or set DATABASE_URL")]
    NoDatabase,
    /// `--database-url ""`.
    #[error("the database URL is empty: pass {}", crate::db::ACCEPTED_URLS)]
    EmptyDatabaseUrl,
    /// A URL whose scheme names no database this binary knows.
    #[error(
        "{url}: unknown database URL scheme {scheme:?}; accepted: {}",
        crate::db::ACCEPTED_URLS
    )]
    UnknownScheme {
        /// The redacted URL.
        url: String,
        /// Its scheme.
        scheme: String,
    },
    /// A SQLite path with no file behind it, given to a command that does not create one.
    #[error(
        "no SQLite database at {0}: check the path, or create it with `waybill migrate` \
         (only migrate creates a file)"
    )]
    NoSqliteFile(String),
    /// The URL names a backend this binary was built without.
    #[error("{url}: this waybill was built without the `{feature}` feature")]
    BackendNotBuilt {
        /// The redacted URL.
        url: String,
        /// The cargo feature that adds it.
        feature: &'static str,
    },
    /// Connecting to the database failed.
    #[error("connecting to {url} failed")]
    Connect {
        /// The redacted URL.
        url: String,
        /// Why.
        #[source]
        source: diesel::ConnectionError,
    },
    /// A database operation failed.
    #[error(transparent)]
    Database(#[from] waybill_diesel::Error),
    /// A pool could not be built.
    #[error("connection pool")]
    Pool(#[from] diesel::r2d2::PoolError),
    /// Not a message id.
    #[error("{0:?} is not a message id (a UUID)")]
    InvalidId(String),
    /// `requeue <id>` of a message that is in the outbox but not parked.
    #[error("message {id} is {status}, not parked; nothing was requeued")]
    NotParked {
        /// The message.
        id: String,
        /// Its status, lower case.
        status: String,
    },
    /// `inbox status --consumer` of a name the inbox does not know.
    #[error("the inbox has no consumer named {consumer:?}; {}", known_consumers(.known))]
    UnknownConsumer {
        /// The name asked for.
        consumer: String,
        /// The names it knows.
        known: Vec<String>,
    },
    /// The broker URL is not amqp://, nats:// or kafka://, or its transport was not built in.
    #[error(
        "{0}: unsupported broker URL (amqp://..., nats://... or kafka://..., with the matching feature)"
    )]
    UnsupportedBroker(String),
    /// Connecting to or preparing the broker failed.
    #[error("broker {url}: {message}")]
    Broker {
        /// The redacted URL.
        url: String,
        /// What failed, with the transport's error chain.
        message: String,
    },
    /// Options that do not fit together or with the broker URL.
    #[error("{0}")]
    Usage(String),
    /// The broker connection flags do not fit, or the password file cannot be read.
    #[error(transparent)]
    BrokerFlags(#[from] waybill_cli::connect::ConnectError),
    /// The metrics endpoint could not be started.
    #[error("serving metrics failed: {0}")]
    Metrics(String),
    /// Reading the confirmation, writing output or installing signal handlers failed.
    #[error("i/o")]
    Io(#[from] std::io::Error),
    /// Writing JSON failed.
    #[error("json")]
    Json(#[from] serde_json::Error),
    /// `waybill partitions` on a database other than PostgreSQL.
    #[error("{0}: partitions are a PostgreSQL layout; this database is not PostgreSQL")]
    PartitionsNeedPostgres(String),
    /// A destructive command was not confirmed.
    #[error("aborted")]
    Aborted,
}

pub(crate) use waybill_outbox_core::error_chain as chain;

fn known_consumers(known: &[String]) -> String {
    if known.is_empty() {
        "it has no records of any consumer yet".to_owned()
    } else {
        format!("consumers with records: {}", known.join(", "))
    }
}
