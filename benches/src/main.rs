//! Measures what the outbox and inbox cost and how fast the relay drains, as ratios against
//! baselines run in the same process: the business transaction alone, the SQL floor of the
//! relay's statement shape, a naive relay, the oxide-outbox peer (feature `oxide`) and the raw
//! brokers. The machine is noisy: read the ratios, not the absolute figures.
//!
//! Run with: `cargo run --release --manifest-path benches/Cargo.toml -- [--quick] [--json PATH]
//! [--only enqueue,inbox,sequenced,drain,oxide,brokers,latency,growth,rolloff]`
//!
//! Servers from `PG_DATABASE_URL` (default `postgres://postgres@127.0.0.1:5432/test`),
//! `AMQP_ADDR` (`amqp://guest:guest@127.0.0.1:5672/%2f`), `NATS_URL`
//! (`nats://127.0.0.1:4222`) and `KAFKA_BROKERS` (`127.0.0.1:19092`). `WAYBILL_BENCH_NO_NOTIFY` disables the NOTIFY trigger for the
//! enqueue scenario; `WAYBILL_BENCH_ONLY_ENQUEUE` runs the enqueue scenario alone. The SVG
//! figures go to `benches/figures/`.

mod brokers;
mod common;
mod drain;
mod enqueue;
mod floor;
mod growth;
mod inbox;
mod latency;
#[cfg(feature = "oxide")]
mod oxide;
mod plots;
mod rolloff;
mod sequenced;

use std::time::Instant;

use diesel::connection::SimpleConnection;

use common::{create_schema, drop_schema, Error, Figures, Settings};

const SCENARIOS: [&str; 9] = [
    "enqueue",
    "inbox",
    "sequenced",
    "drain",
    "oxide",
    "brokers",
    "latency",
    "growth",
    "rolloff",
];

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.into())
}

fn main() -> Result<(), Error> {
    let mut args = std::env::args().skip(1);
    let pg_url = env_or("PG_DATABASE_URL", "postgres://postgres@127.0.0.1:5432/test");
    let mut settings = Settings {
        quick: false,
        amqp_addr: env_or("AMQP_ADDR", "amqp://guest:guest@127.0.0.1:5672/%2f"),
        nats_url: env_or("NATS_URL", "nats://127.0.0.1:4222"),
        kafka_brokers: env_or("KAFKA_BROKERS", "127.0.0.1:19092"),
        schema: format!("waybill_bench_{}", std::process::id()),
        pg_url,
    };
    let mut json = None;
    let mut only: Vec<String> = SCENARIOS.iter().map(|s| s.to_string()).collect();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--quick" => settings.quick = true,
            "--json" => json = Some(args.next().ok_or("--json needs a path")?),
            "--only" => {
                only = args
                    .next()
                    .ok_or("--only needs a list")?
                    .split(',')
                    .map(str::to_owned)
                    .collect()
            }
            "--child-relay" => {
                let schema = args.next().ok_or("--child-relay needs a schema")?;
                let count = args.next().ok_or("--child-relay needs a count")?.parse()?;
                return growth::child_relay(&settings.pg_url, &schema, count);
            }
            other => {
                return Err(format!(
                    "unknown argument {other}; use --quick, --json PATH, --only LIST"
                )
                .into())
            }
        }
    }
    if std::env::var("WAYBILL_BENCH_ONLY_ENQUEUE").is_ok() {
        only = vec!["enqueue".into()];
    }
    if let Some(unknown) = only.iter().find(|s| !SCENARIOS.contains(&s.as_str())) {
        return Err(format!("unknown scenario {unknown}; known: {}", SCENARIOS.join(",")).into());
    }
    let wanted = |name: &str| only.iter().any(|s| s == name);
    if settings.quick {
        println!("--quick: smaller backlogs ({}), 100,000 rows of history, fewer and shorter rounds; the full run takes about 11 minutes", settings.backlog());
    }
    println!("| scenario | A | B | ratio |\n|---|---|---|---|");
    let began = Instant::now();
    let pool = create_schema(&settings.pg_url, &settings.schema)?;
    let mut figures = Figures::default();
    let mut latencies = None;
    let mut failed = Vec::new();
    for scenario in SCENARIOS.iter().filter(|s| wanted(s)) {
        // A failed scenario is reported and the others still run: a long run keeps its figures.
        let outcome = match *scenario {
            "enqueue" => enqueue_scenario(&settings, &pool, &mut figures),
            "inbox" => inbox::run(&settings, &pool, &mut figures),
            "sequenced" => sequenced::run(&settings, &pool, &mut figures),
            "drain" => drain::run(&settings, &pool, &mut figures),
            "oxide" => oxide(&settings, &pool, &mut figures),
            "brokers" => brokers::run(&settings, &pool, &mut figures),
            "latency" => latency::run(&settings, &pool, &mut figures).map(|m| latencies = Some(m)),
            "rolloff" => rolloff::run(&settings, &mut figures),
            _ => growth::run(&settings, &mut figures),
        };
        if let Err(error) = outcome {
            eprintln!("FAILED: scenario {scenario}: {error}");
            failed.push(*scenario);
        }
    }
    std::fs::create_dir_all(plots::dir())?;
    if figures.get("relay_msgs_per_s_b100_r1").is_some() {
        println!("wrote {}", plots::throughput(&figures)?.display());
    }
    if let Some((notify, polling)) = &latencies {
        println!("wrote {}", plots::latency(notify, polling)?.display());
    }
    drop(pool);
    drop_schema(&settings.pg_url, &settings.schema)?;
    figures.set("quick", if settings.quick { 1.0 } else { 0.0 });
    figures.set("elapsed_s", began.elapsed().as_secs_f64());
    let json_text = serde_json::to_string_pretty(&figures.0)?;
    println!("{json_text}");
    if let Some(path) = json {
        std::fs::write(path, json_text)?;
    }
    if failed.is_empty() {
        Ok(())
    } else {
        Err(format!("failed scenarios: {}", failed.join(", ")).into())
    }
}

fn enqueue_scenario(
    settings: &Settings,
    pool: &common::PgPool,
    figures: &mut Figures,
) -> Result<(), Error> {
    let no_notify = std::env::var("WAYBILL_BENCH_NO_NOTIFY").is_ok();
    if no_notify {
        pool.get()?
            .batch_execute("ALTER TABLE outbox_messages DISABLE TRIGGER outbox_messages_notify")?;
    }
    let result = enqueue::run(settings, pool, figures);
    if no_notify {
        pool.get()?
            .batch_execute("ALTER TABLE outbox_messages ENABLE TRIGGER outbox_messages_notify")?;
    }
    result
}

#[cfg(feature = "oxide")]
fn oxide(settings: &Settings, pool: &common::PgPool, figures: &mut Figures) -> Result<(), Error> {
    oxide::run(settings, pool, figures)
}

#[cfg(not(feature = "oxide"))]
fn oxide(_: &Settings, _: &common::PgPool, _: &mut Figures) -> Result<(), Error> {
    common::row(
        "oxide-outbox peer",
        "not built: add `--features oxide`",
        "",
        "",
    );
    Ok(())
}
