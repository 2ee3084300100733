//! `waybill relay`: relays on threads over one pool, Prometheus metrics, graceful shutdown.

use std::collections::HashSet;
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use diesel::r2d2::{ConnectionManager, Pool};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
use waybill_diesel::DieselStore;
use waybill_outbox_core::metrics::{
    OUTBOX_OLDEST_PENDING_AGE, OUTBOX_PARKED, OUTBOX_PENDING, RELAY_BATCH_SECONDS,
    RELAY_MESSAGE_AGE_SECONDS, TOPIC_LABEL,
};
use waybill_outbox_core::{Publisher, Relay, RelayConfig};

use crate::cli::RelayArgs;
use crate::db::{Backend, Prepare};
use crate::error::{chain, CliError};
use waybill_outbox_core::redact_url as redact;

type DbPool<C> = Pool<ConnectionManager<C>>;

/// Bucket bounds (seconds) of the time a message spent in the outbox: from a few milliseconds
/// (a relay keeping up) to an hour (a long broker outage).
const MESSAGE_AGE_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0,
];
/// Bucket bounds (seconds) of a batch from claim to write-back.
const BATCH_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// The Prometheus exporter at `addr`. The two histograms are exported with buckets, not as
/// summaries, so a dashboard can add them up over several relays (`histogram_quantile` of the
/// summed `_bucket` rates); a summary's quantiles cannot be combined.
fn exporter(
    addr: std::net::SocketAddr,
) -> Result<PrometheusBuilder, metrics_exporter_prometheus::BuildError> {
    PrometheusBuilder::new()
        .with_http_listener(addr)
        .set_buckets_for_metric(
            Matcher::Full(RELAY_MESSAGE_AGE_SECONDS.into()),
            MESSAGE_AGE_BUCKETS,
        )?
        .set_buckets_for_metric(Matcher::Full(RELAY_BATCH_SECONDS.into()), BATCH_BUCKETS)
}

/// Runs the relays until SIGTERM or SIGINT, then stops them and returns.
pub(crate) fn run<C: Backend>(url: &str, args: RelayArgs) -> Result<(), CliError> {
    // Registered first, so a signal during start-up still stops the relays cleanly.
    let mut signals = Signals::new([SIGTERM, SIGINT])?;
    if let Some(addr) = args.metrics_addr {
        if !addr.ip().is_loopback() {
            log::warn!(
                "metrics at {addr} are reachable from other hosts and have no authentication; \
                 bind 127.0.0.1 unless a firewall or proxy guards the port"
            );
        }
        exporter(addr)
            .and_then(PrometheusBuilder::install)
            .map_err(|e| CliError::Metrics(e.to_string()))?;
        log::info!("serving Prometheus metrics at http://{addr}/metrics");
    }
    let relays = args.relays.max(1);
    // Each relay keeps one connection listening for wake-ups and uses one more at a time for
    // its claims and write-backs; the stats sampler needs one, and one is spare.
    // Connection failures reach the log through the relays' own errors (which carry the
    // pool's last error), once per round, not once per attempt as r2d2's default handler
    // would log them.
    let pool: DbPool<C> = Pool::builder()
        .max_size(u32::try_from(2 * relays + 2).unwrap_or(u32::MAX))
        .connection_customizer(Box::new(Prepare))
        .error_handler(Box::new(diesel::r2d2::NopErrorHandler))
        .build(ConnectionManager::new(url))?;
    let broker = args.connect.url(&args.broker_url)?;
    if broker.starts_with("amqp://") || broker.starts_with("amqps://") {
        #[cfg(feature = "amqp")]
        {
            let config = waybill_amqp::PublisherConfig::default().tls(args.connect.amqp_tls());
            let publishers = (0..relays)
                .map(|_| {
                    waybill_amqp::AmqpPublisher::connect(&broker, config.clone())
                        .map_err(|e| broker_error(&broker, &e))
                })
                .collect::<Result<Vec<_>, _>>()?;
            // The publisher declares each topic's exchange (durable, topic) on first use.
            log::info!(
                "topics {:?}: exchanges are declared on first publish",
                args.topics
            );
            return run_relays(pool, publishers, &args, &mut signals);
        }
    }
    if broker.starts_with("nats://") || broker.starts_with("tls://") {
        #[cfg(feature = "nats")]
        {
            let config = waybill_nats::PublisherConfig::default()
                .connect_options(args.connect.nats_options());
            let publishers = (0..relays)
                .map(|_| {
                    waybill_nats::NatsPublisher::connect(&broker, config.clone())
                        .map_err(|e| broker_error(&broker, &e))
                })
                .collect::<Result<Vec<_>, _>>()?;
            if let Some(first) = publishers.first() {
                for topic in &args.topics {
                    let stream = waybill_nats::sanitize_token(topic);
                    let wildcard = format!("{topic}.>");
                    first
                        .ensure_stream(&stream, &[topic, &wildcard])
                        .map_err(|e| broker_error(&broker, &e))?;
                    log::info!("stream {stream} captures {topic} and {wildcard}");
                }
            }
            return run_relays(pool, publishers, &args, &mut signals);
        }
    }
    if broker.starts_with("kafka://") {
        #[cfg(feature = "kafka")]
        {
            let config = args.connect.kafka_publisher();
            for topic in &args.topics {
                let properties = config.properties();
                waybill_kafka::ensure_topic_with(&broker, topic, args.kafka_partitions, properties)
                    .map_err(|e| broker_error(&broker, &e))?;
                log::info!("Kafka topic {topic} is there");
            }
            let publishers = (0..relays)
                .map(|_| {
                    waybill_kafka::KafkaPublisher::connect(&broker, config.clone())
                        .map_err(|e| broker_error(&broker, &e))
                })
                .collect::<Result<Vec<_>, _>>()?;
            return run_relays(pool, publishers, &args, &mut signals);
        }
    }
    // Without transports built in, nothing uses them.
    #[cfg(not(all(feature = "amqp", feature = "nats", feature = "kafka")))]
    let _ = (&pool, &mut signals);
    Err(CliError::UnsupportedBroker(redact(&broker)))
}

#[allow(dead_code)] // unused when no transport is built in
fn broker_error(url: &str, error: &dyn std::error::Error) -> CliError {
    CliError::Broker {
        url: redact(url),
        message: chain(error),
    }
}

#[allow(dead_code)] // unused when no transport is built in
fn run_relays<C: Backend, P: Publisher + Send + 'static>(
    pool: DbPool<C>,
    publishers: Vec<P>,
    args: &RelayArgs,
    signals: &mut Signals,
) -> Result<(), CliError> {
    let prefix = args.owner.clone().unwrap_or_else(default_owner);
    let mut handles = Vec::new();
    let mut threads = Vec::new();
    for (n, publisher) in publishers.into_iter().enumerate() {
        let mut config = RelayConfig::default()
            .batch_size(args.batch_size)
            .owner(format!("{prefix}-{n}"));
        if let Some(lease) = args.lease {
            config = config.lease(lease);
        }
        if let Some(interval) = args.poll_interval {
            config = config.poll_interval(interval);
        }
        let store = DieselStore::try_new(pool.clone())?;
        let mut relay = Relay::new(store, publisher, config);
        handles.push(relay.handle());
        threads.push(
            thread::Builder::new()
                .name(format!("relay-{n}"))
                .spawn(move || relay.run_pipelined())?,
        );
    }
    let (stop_sampler, stopped) = mpsc::channel::<()>();
    let sampler = {
        let pool = pool.clone();
        let interval = args.stats_interval;
        thread::Builder::new()
            .name("outbox-gauges".into())
            .spawn(move || sample_gauges(&pool, interval, &stopped))?
    };
    let count = threads.len();
    let noun = crate::operate::plural(count as u64, "relay", "relays");
    log::info!("{count} {noun} running as {prefix}-*");
    if let Some(signal) = signals.forever().next() {
        log::info!("signal {signal}: stopping the relays");
    }
    for handle in &handles {
        handle.stop();
    }
    drop(stop_sampler);
    for thread in threads {
        match thread.join() {
            Ok(totals) => log::info!("relay stopped: {totals:?}"),
            Err(_) => log::error!("a relay thread panicked"),
        }
    }
    if sampler.join().is_err() {
        log::error!("the gauge sampler panicked");
    }
    Ok(())
}

/// Sets the per-topic outbox gauges every `interval` until `stop` disconnects.
fn sample_gauges<C: Backend>(pool: &DbPool<C>, interval: Duration, stop: &mpsc::Receiver<()>) {
    let mut topics = HashSet::new();
    loop {
        match sample_once(pool, &topics) {
            Ok(seen) => topics = seen,
            Err(error) => log::warn!("sampling the outbox gauges failed: {error}"),
        }
        if !matches!(
            stop.recv_timeout(interval),
            Err(mpsc::RecvTimeoutError::Timeout)
        ) {
            return;
        }
    }
}

/// Sets the gauges of every topic in the outbox, and zeroes those of `before` that left it
/// (all their messages were published and deleted). Returns the topics seen.
fn sample_once<C: Backend>(
    pool: &DbPool<C>,
    before: &HashSet<String>,
) -> Result<HashSet<String>, CliError> {
    let mut conn = pool.get()?;
    let now = waybill_diesel::outbox_clock(&mut *conn)?;
    let stats = waybill_diesel::topic_stats(&mut *conn)?;
    let seen: HashSet<String> = stats.iter().map(|s| s.topic.clone()).collect();
    let gone = before
        .difference(&seen)
        .map(|topic| (topic.clone(), 0, 0, 0.0));
    let current = stats.into_iter().map(|s| {
        let age = s.oldest_pending.map_or(0.0, |at| {
            (now - at).num_milliseconds().max(0) as f64 / 1000.0
        });
        (s.topic, s.pending, s.parked, age)
    });
    for (topic, pending, parked, age) in current.chain(gone.collect::<Vec<_>>()) {
        metrics::gauge!(OUTBOX_PENDING, TOPIC_LABEL => topic.clone()).set(pending as f64);
        metrics::gauge!(OUTBOX_PARKED, TOPIC_LABEL => topic.clone()).set(parked as f64);
        metrics::gauge!(OUTBOX_OLDEST_PENDING_AGE, TOPIC_LABEL => topic).set(age);
    }
    Ok(seen)
}

fn default_owner() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|h| h.trim().to_owned())
        })
        .unwrap_or_else(|| "waybill".to_owned());
    format!("{host}-{}", std::process::id())
}
