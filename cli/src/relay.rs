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
    let broker = broker_url(&args)?;
    let is_nats = broker.starts_with("nats://") || broker.starts_with("tls://");
    if args.nats.any() && !is_nats {
        return Err(CliError::Usage(format!(
            "--nats-* options need a nats:// or tls:// broker URL, not {}",
            redact(&broker)
        )));
    }
    if args.amqp.any() && !broker.starts_with("amqps://") {
        return Err(CliError::Usage(format!(
            "--amqp-* options need an amqps:// broker URL, not {}",
            redact(&broker)
        )));
    }
    if broker.starts_with("amqp://") || broker.starts_with("amqps://") {
        #[cfg(feature = "amqp")]
        {
            let config = waybill_amqp::PublisherConfig::default().tls(amqp_tls(&args.amqp));
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
    if is_nats {
        #[cfg(feature = "nats")]
        {
            let config =
                waybill_nats::PublisherConfig::default().connect_options(nats_options(&args.nats));
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
            for topic in &args.topics {
                waybill_kafka::ensure_topic(&broker, topic, args.kafka_partitions)
                    .map_err(|e| broker_error(&broker, &e))?;
                log::info!("Kafka topic {topic} is there");
            }
            let publishers = (0..relays)
                .map(|_| {
                    waybill_kafka::KafkaPublisher::connect(&broker, Default::default())
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

/// The TLS options the `--amqp-*` flags ask for.
#[cfg(feature = "amqp")]
fn amqp_tls(args: &crate::cli::AmqpArgs) -> waybill_amqp::TlsOptions {
    let mut tls = waybill_amqp::TlsOptions::default();
    if let Some(path) = &args.amqp_ca {
        tls = tls.root_certificates(path);
    }
    if let (Some(cert), Some(key)) = (&args.amqp_client_cert, &args.amqp_client_key) {
        tls = tls.client_certificate(cert, key);
    }
    tls
}

/// The NATS connect options the `--nats-*` flags ask for.
#[cfg(feature = "nats")]
fn nats_options(args: &crate::cli::NatsArgs) -> waybill_nats::ConnectOptions {
    let mut options = waybill_nats::ConnectOptions::default().require_tls(args.nats_require_tls);
    if let Some(path) = &args.nats_creds {
        options = options.credentials_file(path);
    }
    if let Some(path) = &args.nats_nkey_file {
        options = options.nkey_seed_file(path);
    }
    if let Some(path) = &args.nats_token_file {
        options = options.token_file(path);
    }
    if let Some(path) = &args.nats_ca {
        options = options.root_certificates(path);
    }
    if let (Some(cert), Some(key)) = (&args.nats_client_cert, &args.nats_client_key) {
        options = options.client_certificate(cert, key);
    }
    options
}

/// `--broker-url`, with the password of `--broker-password-file` filled into its user info.
fn broker_url(args: &RelayArgs) -> Result<String, CliError> {
    let url = args.broker_url.clone();
    let Some(path) = &args.broker_password_file else {
        return Ok(url);
    };
    if url.starts_with("kafka://") {
        return Err(CliError::Usage(
            "--broker-password-file is not supported for kafka:// yet".into(),
        ));
    }
    let password =
        waybill_outbox_core::read_secret_file(path).map_err(|source| CliError::SecretFile {
            what: "broker password file",
            path: path.clone(),
            source,
        })?;
    with_password(&url, &password).ok_or_else(|| {
        CliError::Usage(format!(
            "--broker-password-file needs a user and no password in --broker-url \
             (SCHEME://USER@HOST...), not {}",
            redact(&url)
        ))
    })
}

/// `url` (each of a comma-separated list) with `password` percent-encoded after the user of
/// its user info; `None` when no URL has a user, or one already has a password.
fn with_password(url: &str, password: &str) -> Option<String> {
    let encoded: String = password
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                char::from(b).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect();
    let mut filled = false;
    let urls = url
        .split(',')
        .map(|one| {
            let (scheme, rest) = one.split_once("://")?;
            let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
            let Some(at) = rest[..authority_end].rfind('@') else {
                return Some(one.to_owned());
            };
            let (user, host) = (&rest[..at], &rest[at..]);
            if user.contains(':') || user.is_empty() {
                return None;
            }
            filled = true;
            Some(format!("{scheme}://{user}:{encoded}{host}"))
        })
        .collect::<Option<Vec<_>>>()?;
    filled.then(|| urls.join(","))
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

#[cfg(test)]
mod tests {
    use super::with_password;

    #[test]
    fn the_password_is_filled_in_percent_encoded_after_the_user() {
        assert_eq!(
            with_password("amqps://relay@mq:5671/%2f", "p@ss:w/rd").as_deref(),
            Some("amqps://relay:p%40ss%3Aw%2Frd@mq:5671/%2f")
        );
        assert_eq!(
            with_password("nats://relay@h1:4222,nats://relay@h2:4222", "pw").as_deref(),
            Some("nats://relay:pw@h1:4222,nats://relay:pw@h2:4222")
        );
        assert_eq!(with_password("nats://h1:4222", "pw"), None); // no user
        assert_eq!(with_password("amqp://u:old@h/%2f", "pw"), None); // a password already
        assert_eq!(with_password("amqp://h/v@x", "pw"), None); // `@` after the authority
    }
}
