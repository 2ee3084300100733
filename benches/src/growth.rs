//! Growth: drain throughput with a large published history in the table against an empty
//! table (two schemas, alternating); the table size over repeated fill + drain cycles with
//! retention on; and the relay's peak RSS, measured in a child process.

use std::process::Command;
use std::time::Duration;

use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel::sql_types::BigInt;
use waybill_outbox_core::{RelayConfig, Retention};

use crate::common::{
    alternate, create_schema, drain, drop_schema, empty_outbox, fill_pg, pg_pool, rate, row,
    thousands, Error, Figures, NoopPublisher, PgPool, Settings,
};

fn keep() -> RelayConfig {
    RelayConfig::default()
        .batch_size(1000)
        .retention(Retention::Keep(Duration::from_secs(86_400)))
}

/// One drain under retention. The empty table starts every round empty. The table with history
/// keeps it, and the rows each round marks; after its drain it is vacuumed (untimed), as a
/// service's autovacuum would, so that its next round measures the history, not the dead
/// versions of the rows just marked (which the empty table's truncation removes).
fn keep_round(pool: &PgPool, count: usize, truncate: bool) -> Result<f64, Error> {
    if truncate {
        empty_outbox(&mut *pool.get()?)?;
    }
    fill_pg(&mut *pool.get()?, "orders", count, 0)?;
    let rate = drain(pool, count, 1, keep(), || Ok(NoopPublisher))?;
    if !truncate {
        vacuum(&mut *pool.get()?)?;
    }
    Ok(rate)
}

fn table_bytes(conn: &mut PgConnection) -> Result<i64, Error> {
    #[derive(QueryableByName)]
    struct Size {
        #[diesel(sql_type = BigInt)]
        bytes: i64,
    }
    let size: Size = diesel::sql_query("SELECT pg_total_relation_size('outbox_messages') AS bytes")
        .get_result(conn)?;
    Ok(size.bytes)
}

/// Lets vacuum see the dead rows of the last drain, as it does in a service: waits until the
/// autovacuum daemon has vacuumed the outbox and left fewer dead rows than the migration's
/// threshold (5,000; the daemon naps a minute between rounds), or, on a server where autovacuum
/// is off, vacuums the outbox itself as an operator's maintenance job would. Says which.
fn vacuum(conn: &mut PgConnection) -> Result<&'static str, Error> {
    #[derive(QueryableByName)]
    struct Setting {
        #[diesel(sql_type = diesel::sql_types::Text)]
        autovacuum: String,
    }
    #[derive(QueryableByName)]
    struct Visited {
        #[diesel(sql_type = diesel::sql_types::Bool)]
        done: bool,
    }
    let setting: Setting =
        diesel::sql_query("SELECT current_setting('autovacuum') AS autovacuum").get_result(conn)?;
    if setting.autovacuum != "on" {
        conn.batch_execute("VACUUM outbox_messages")?;
        return Ok("VACUUM after each cycle (autovacuum is off on this server)");
    }
    let since = chrono::Utc::now();
    let deadline = std::time::Instant::now() + Duration::from_secs(300);
    loop {
        // The statistics are the server's, cached per transaction: a fresh snapshot each time.
        conn.batch_execute("SELECT pg_stat_clear_snapshot()")?;
        let visited: Visited = diesel::sql_query(
            "SELECT coalesce(last_autovacuum > $1 AND n_dead_tup < 5000, false) AS done \
             FROM pg_stat_user_tables WHERE relid = 'outbox_messages'::regclass",
        )
        .bind::<diesel::sql_types::Timestamptz, _>(since)
        .get_result(conn)?;
        if visited.done {
            return Ok("autovacuum after each cycle");
        }
        if std::time::Instant::now() > deadline {
            return Err("autovacuum did not visit the outbox within 5 minutes".into());
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

pub fn run(settings: &Settings, figures: &mut Figures) -> Result<(), Error> {
    let (empty_schema, history_schema) = (
        format!("{}_empty", settings.schema),
        format!("{}_history", settings.schema),
    );
    let result = (|| -> Result<(), Error> {
        let empty = create_schema(&settings.pg_url, &empty_schema)?;
        let history = create_schema(&settings.pg_url, &history_schema)?;
        let rows = settings.pick(100_000, 1_000_000);
        let backlog = settings.backlog();
        {
            let mut conn = history.get()?;
            fill_pg(&mut conn, "orders", rows, 1)?;
            conn.batch_execute("VACUUM ANALYZE outbox_messages")?;
        }
        let (a, b) = alternate(
            settings.rounds(),
            || keep_round(&empty, backlog, true),
            || keep_round(&history, backlog, false),
        )?;
        row(
            &format!("relay drain, {backlog} backlog, batch 1000, retention keep: empty table vs {} rows of published history", thousands(rows as f64)),
            &rate(a, "msg/s"),
            &rate(b, "msg/s"),
            &format!("{:.2} (`growth_ratio`)", b / a),
        );
        figures.set("growth_history_rows", rows as f64);
        figures.set("growth_empty_msgs_per_s", a);
        figures.set("growth_history_msgs_per_s", b);
        figures.set("growth_ratio", b / a);
        drop(history);
        drop_schema(&settings.pg_url, &history_schema)?;

        // Retention on (delete on publish): fill and drain again and again; the table must not
        // grow. Deleted rows' space is reused once vacuum has seen them, so each cycle ends with
        // a vacuum of the table, as in a service.
        empty_outbox(&mut *empty.get()?)?;
        let cycles = settings.pick(3, 6);
        let mut sizes = Vec::new();
        let mut vacuumed = "";
        for _ in 0..cycles {
            fill_pg(&mut *empty.get()?, "orders", backlog, 0)?;
            drain(
                &empty,
                backlog,
                1,
                RelayConfig::default().batch_size(1000),
                || Ok(NoopPublisher),
            )?;
            vacuumed = vacuum(&mut *empty.get()?)?;
            sizes.push(table_bytes(&mut *empty.get()?)? as f64);
        }
        let (first, last) = (sizes[0], sizes[sizes.len() - 1]);
        row(
            &format!(
                "table size after fill + drain of {backlog}, retention on, {vacuumed}: cycle 1 vs cycle {cycles} (every cycle: {} MB)",
                sizes.iter().map(|b| format!("{:.1}", b / 1e6)).collect::<Vec<_>>().join(", ")
            ),
            &format!("{:.1} MB", first / 1e6),
            &format!("{:.1} MB", last / 1e6),
            &format!("{:.2}", last / first),
        );
        figures.set("table_mb_after_first_cycle", first / 1e6);
        figures.set("table_mb_after_last_cycle", last / 1e6);
        figures.set("table_growth_over_cycles", last / first);
        // The last cycles against the ones before: 1.0 once the size has settled.
        let half = sizes.len() / 2;
        figures.set(
            "table_growth_second_half",
            last / sizes[half.saturating_sub(1)],
        );

        // Peak RSS of a relay draining the backlog in a process of its own.
        empty_outbox(&mut *empty.get()?)?;
        fill_pg(&mut *empty.get()?, "orders", backlog, 0)?;
        let output = Command::new(std::env::current_exe()?)
            .args(["--child-relay", &empty_schema, &backlog.to_string()])
            .env("PG_DATABASE_URL", &settings.pg_url)
            .output()?;
        if !output.status.success() {
            return Err(format!(
                "the child relay failed: {}",
                String::from_utf8_lossy(&output.stderr)
            )
            .into());
        }
        let stdout = String::from_utf8_lossy(&output.stdout);
        let field = |name: &str| -> Result<f64, Error> {
            stdout
                .split_whitespace()
                .find_map(|kv| kv.strip_prefix(name))
                .ok_or_else(|| format!("the child relay printed no {name}: {stdout}"))?
                .parse::<f64>()
                .map_err(Error::from)
        };
        let (peak_kb, child_rate) = (field("vm_hwm_kb=")?, field("msgs_per_s=")?);
        row(
            &format!("relay peak RSS (VmHWM), own process, {backlog} backlog, batch 1000"),
            &format!("{:.1} MB", peak_kb / 1024.0),
            &rate(child_rate, "msg/s"),
            "",
        );
        figures.set("relay_peak_rss_mb", peak_kb / 1024.0);
        Ok(())
    })();
    drop_schema(&settings.pg_url, &empty_schema)?;
    drop_schema(&settings.pg_url, &history_schema)?;
    result
}

/// The hidden `--child-relay SCHEMA COUNT` mode: drain COUNT pending messages of SCHEMA, then
/// print the drain rate and this process's peak RSS.
pub fn child_relay(pg_url: &str, schema: &str, count: usize) -> Result<(), Error> {
    let pool = pg_pool(pg_url, schema, 2)?;
    let rate = drain(
        &pool,
        count,
        1,
        RelayConfig::default().batch_size(1000),
        || Ok(NoopPublisher),
    )?;
    let status = std::fs::read_to_string("/proc/self/status")?;
    let peak_kb = status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .ok_or("no VmHWM in /proc/self/status")?;
    println!("vm_hwm_kb={peak_kb} msgs_per_s={rate:.0}");
    Ok(())
}
