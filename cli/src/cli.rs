//! The command line, parsed by clap.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use clap::{ArgGroup, Args as ClapArgs, Parser, Subcommand};
use waybill_outbox_core::RelayConfig;

/// The waybill relay and operator commands.
#[derive(Debug, Parser)]
#[command(name = "waybill", version, about)]
pub(crate) struct Args {
    /// postgres://..., mysql://..., sqlite://PATH or a plain SQLite file path.
    #[arg(long, env = "DATABASE_URL", global = true, hide_env_values = true)]
    pub(crate) database_url: Option<String>,
    /// Machine-readable JSON on stdout instead of tables (status, parked, inbox status, marks, gaps).
    #[arg(long, global = true)]
    pub(crate) json: bool,
    /// The command.
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Run relays that publish committed outbox messages, until SIGTERM or SIGINT.
    Relay(Box<RelayArgs>),
    /// The operator commands.
    #[command(flatten)]
    Operation(Operation),
}

/// The commands that work on the database alone.
#[derive(Debug, Subcommand)]
pub(crate) enum Operation {
    /// Per topic: pending, parked, published in the retention window, oldest pending age and
    /// the relays holding leases.
    Status,
    /// Parked messages: list them or show one.
    Parked {
        /// What to do with parked messages.
        #[command(subcommand)]
        command: ParkedCommand,
    },
    /// Put parked messages back to pending: one, all of a key, or all.
    Requeue(RequeueArgs),
    /// Give up on a parked message: move it to outbox_skipped with a reason.
    Skip {
        /// The parked message's id.
        id: String,
        /// Why it is skipped (kept with it).
        #[arg(long)]
        reason: String,
        /// Who skips it. Defaults to $USER.
        #[arg(long, env = "USER", hide_env_values = true)]
        by: Option<String>,
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
    },
    /// Delete published and skipped messages older than a duration (e.g. 7d, 12h).
    Purge {
        /// Age: published_at for published messages, skipped_at for skipped ones.
        #[arg(long, value_parser = humantime::parse_duration)]
        older_than: Duration,
        /// Rows per DELETE statement.
        #[arg(long, default_value_t = 1000)]
        batch_size: usize,
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
    },
    /// Inbox commands.
    Inbox {
        /// What to show.
        #[command(subcommand)]
        command: InboxCommand,
    },
    /// Draw a new producer epoch for sequenced messages. Run it after restoring the database
    /// from a backup or failing it over (see docs/guarantees.md): consumers then refuse
    /// numbers that went back instead of skipping them as duplicates.
    RotateEpoch {
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
    },
    /// Run the embedded migrations that have not run yet.
    Migrate,
    /// PostgreSQL's partitioned layout: history and inbox records forgotten by dropping time
    /// partitions instead of DELETE (see docs/operations.md).
    Partitions {
        /// What to do.
        #[command(subcommand)]
        command: PartitionsCommand,
    },
}

/// `waybill partitions ...` (PostgreSQL only).
#[derive(Debug, Subcommand)]
pub(crate) enum PartitionsCommand {
    /// Per partitioned table: width, retention, partitions, how far ahead inserts find theirs
    /// made, and what the next roll-off drops.
    Status,
    /// Make the current partition and the configured number ahead where missing.
    CreateAhead,
    /// Detach (CONCURRENTLY) and drop the partitions past retention; one roll-off at a time.
    RollOff {
        /// Return at once when another roll-off runs, instead of waiting for it.
        #[arg(long)]
        no_wait: bool,
    },
    /// Switch to the partitioned layout, moving the history and the inbox records (writers
    /// wait while they are copied).
    Adopt {
        /// Time range of one partition (whole seconds, e.g. 1d, 6h).
        #[arg(long, value_parser = humantime::parse_duration, default_value = "1d")]
        width: Duration,
        /// How long published history is kept.
        #[arg(long, value_parser = humantime::parse_duration, default_value = "7d")]
        outbox_retention: Duration,
        /// How long inbox records are kept (at least every consumer's retention window).
        #[arg(long, value_parser = humantime::parse_duration, default_value = "7d")]
        inbox_retention: Duration,
        /// Partitions past the current one to keep ready.
        #[arg(long, default_value_t = 3)]
        ahead: u32,
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
    },
    /// Switch back to the plain layout, moving the history and the records back.
    Revert {
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum ParkedCommand {
    /// Parked messages in outbox order.
    List {
        /// At most this many.
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// One message: payload preview, last error, attempts.
    Show {
        /// The message id.
        id: String,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum InboxCommand {
    /// What a consumer's inbox keeps.
    Status {
        /// The consumer name.
        #[arg(long)]
        consumer: String,
    },
    /// Per consumer and sequenced key: the last number applied (process_in_order).
    Marks {
        /// Only this consumer's marks.
        #[arg(long)]
        consumer: Option<String>,
        /// At most this many.
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Sequenced messages held back behind a gap, or parked after the gap wait, whose key has
    /// not moved past them since.
    Gaps {
        /// Only this consumer's gaps.
        #[arg(long)]
        consumer: Option<String>,
    },
}

#[derive(Debug, ClapArgs)]
#[command(group(ArgGroup::new("target").required(true).args(["id", "key", "all_parked"])))]
pub(crate) struct RequeueArgs {
    /// The parked message's id.
    pub(crate) id: Option<String>,
    /// Every parked message of this partition key.
    #[arg(long)]
    pub(crate) key: Option<String>,
    /// Every parked message.
    #[arg(long)]
    pub(crate) all_parked: bool,
    /// Do not ask for confirmation.
    #[arg(long)]
    pub(crate) yes: bool,
}

#[derive(Debug, ClapArgs)]
pub(crate) struct RelayArgs {
    /// amqp://... (RabbitMQ), nats://... (NATS JetStream) or kafka://HOST:PORT (Kafka;
    /// comma-separated for several brokers).
    #[arg(long, env = "BROKER_URL", hide_env_values = true)]
    pub(crate) broker_url: String,
    /// Topics to ensure on the broker at start (NATS: a stream per topic, named like the topic
    /// with `.`, `*`, `>` and spaces replaced by `_`, capturing `<topic>` and `<topic>.>`;
    /// RabbitMQ: a durable topic exchange per topic; Kafka: the topic, with
    /// `--kafka-partitions` partitions, when missing). Claims are not filtered.
    #[arg(long, env = "WAYBILL_TOPICS", value_delimiter = ',')]
    pub(crate) topics: Vec<String>,
    /// Messages per claim (1 to 50,000).
    #[arg(long, default_value_t = 100, value_parser = parse_batch_size)]
    pub(crate) batch_size: usize,
    /// Relay threads in this process, each its own relay over one pool.
    #[arg(long, default_value_t = 1)]
    pub(crate) relays: usize,
    /// Broker connection options: password file, NATS, RabbitMQ and Kafka security.
    #[command(flatten)]
    pub(crate) connect: waybill_cli::connect::BrokerArgs,
    /// Serve Prometheus metrics (no authentication) at http://ADDR/metrics. A bare PORT binds
    /// 127.0.0.1:PORT, this host only; to let a Prometheus on another host scrape it, give
    /// the address to bind, e.g. 0.0.0.0:9090 (with a firewall in front). Off by default.
    #[arg(long, env = "WAYBILL_METRICS_ADDR", value_parser = parse_metrics_addr)]
    pub(crate) metrics_addr: Option<SocketAddr>,
    /// How long a claim holds its messages (e.g. 30s; 1ms to 1day).
    #[arg(long, value_parser = parse_lease)]
    pub(crate) lease: Option<Duration>,
    /// Longest wait between polls when idle (e.g. 1s).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub(crate) poll_interval: Option<Duration>,
    /// How often the outbox gauges (pending, parked, oldest pending age) are sampled.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "5s")]
    pub(crate) stats_interval: Duration,
    /// Partitions of a Kafka topic that `--topics` creates (an existing topic is left as it is).
    #[arg(long, env = "WAYBILL_KAFKA_PARTITIONS", default_value_t = 6)]
    pub(crate) kafka_partitions: i32,
    /// Relay owner name prefix; each relay appends `-<n>`. Defaults to `<host>-<pid>`.
    #[arg(long)]
    pub(crate) owner: Option<String>,
}

/// A metrics address: `HOST:PORT`, or a bare `PORT` on loopback.
fn parse_metrics_addr(text: &str) -> Result<SocketAddr, String> {
    if let Ok(port) = text.parse::<u16>() {
        return Ok(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port));
    }
    text.parse()
        .map_err(|_| format!("expected PORT or HOST:PORT (e.g. 127.0.0.1:9090), not {text}"))
}

/// A batch size the relay accepts, or a usage error (the relay would only clamp it).
fn parse_batch_size(text: &str) -> Result<usize, String> {
    let size: usize = text.parse().map_err(|e| format!("{e}"))?;
    if (1..=RelayConfig::MAX_BATCH_SIZE).contains(&size) {
        Ok(size)
    } else {
        Err(format!(
            "must be 1 to {}, not {size}",
            RelayConfig::MAX_BATCH_SIZE
        ))
    }
}

/// A lease the relay accepts, or a usage error (the relay would only clamp it).
fn parse_lease(text: &str) -> Result<Duration, String> {
    let lease = humantime::parse_duration(text).map_err(|e| e.to_string())?;
    if (RelayConfig::MIN_LEASE..=RelayConfig::MAX_LEASE).contains(&lease) {
        Ok(lease)
    } else {
        Err(format!("must be 1ms to 1day, not {text}"))
    }
}

#[cfg(test)]
mod tests {
    use super::parse_metrics_addr;

    #[test]
    fn a_bare_metrics_port_binds_loopback_only() {
        assert_eq!(
            parse_metrics_addr("9090").map(|a| a.to_string()),
            Ok("127.0.0.1:9090".to_owned())
        );
        assert_eq!(
            parse_metrics_addr("0.0.0.0:9090").map(|a| a.to_string()),
            Ok("0.0.0.0:9090".to_owned())
        );
        assert!(parse_metrics_addr("localhost").is_err());
    }
}
