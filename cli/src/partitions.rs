//! `waybill partitions status|create-ahead|roll-off|adopt|revert` on PostgreSQL.

use std::io::Write;

use chrono::SecondsFormat;
use diesel::PgConnection;
use serde_json::json;
use waybill_diesel::partitions::{self, PartitionConfig, PartitionedTable};

use crate::cli::PartitionsCommand;
use crate::error::CliError;
use crate::operate::confirm;

/// Runs one `partitions` command on `conn`.
pub(crate) fn run(
    conn: &mut PgConnection,
    command: PartitionsCommand,
    json: bool,
) -> Result<(), CliError> {
    let mut out = std::io::stdout().lock();
    match command {
        PartitionsCommand::Status => status(&mut out, &partitions::status(conn)?, json),
        PartitionsCommand::CreateAhead => {
            let created = partitions::create_ahead(conn)?;
            if json {
                return print(&mut out, &json!({ "created": created }));
            }
            if created.is_empty() {
                writeln!(out, "every partition ahead was there already")?;
            }
            for name in created {
                writeln!(out, "created {name}")?;
            }
            Ok(())
        }
        PartitionsCommand::RollOff { no_wait } => {
            let rolled = partitions::roll_off(conn, !no_wait)?;
            if json {
                return print(
                    &mut out,
                    &json!({ "dropped": rolled.dropped, "busy": rolled.busy }),
                );
            }
            if rolled.busy {
                writeln!(out, "another roll-off is running: nothing done")?;
            } else if rolled.dropped.is_empty() {
                writeln!(out, "no partition is past retention")?;
            }
            for name in rolled.dropped {
                writeln!(out, "dropped {name}")?;
            }
            Ok(())
        }
        PartitionsCommand::Adopt {
            width,
            outbox_retention,
            inbox_retention,
            ahead,
            yes,
        } => {
            confirm(
                yes,
                "Move the published history and the inbox records into partitioned tables \
                 (writers wait while they are copied)?",
            )?;
            let config = PartitionConfig::default()
                .width(width)
                .outbox_retention(outbox_retention)
                .inbox_retention(inbox_retention)
                .ahead(ahead);
            partitions::adopt(conn, &config)?;
            writeln!(out, "adopted the partitioned layout")?;
            Ok(())
        }
        PartitionsCommand::Revert { yes } => {
            confirm(
                yes,
                "Move the history and the inbox records back to the plain tables?",
            )?;
            partitions::revert(conn)?;
            writeln!(out, "reverted to the plain layout")?;
            Ok(())
        }
    }
}

fn print(out: &mut impl Write, value: &serde_json::Value) -> Result<(), CliError> {
    serde_json::to_writer_pretty(&mut *out, value)?;
    writeln!(out)?;
    Ok(())
}

fn status(out: &mut impl Write, tables: &[PartitionedTable], json: bool) -> Result<(), CliError> {
    let time = |at: chrono::DateTime<chrono::Utc>| at.to_rfc3339_opts(SecondsFormat::Secs, true);
    if json {
        let tables: Vec<_> = tables
            .iter()
            .map(|t| {
                json!({
                    "table": t.parent,
                    "width_s": t.width.as_secs_f64(),
                    "retention_s": t.retention.as_secs_f64(),
                    "ahead": t.ahead,
                    "now": time(t.now),
                    "ready_until": t.ready_until().map(time),
                    "due_for_roll_off": t.due_for_roll_off().iter().map(|p| &p.name).collect::<Vec<_>>(),
                    "partitions": t.partitions.iter().map(|p| json!({
                        "name": p.name,
                        "from": time(p.from),
                        "to": time(p.to),
                        "rows_estimate": p.rows_estimate,
                        "bytes": p.bytes,
                        "detach_pending": p.detach_pending,
                    })).collect::<Vec<_>>(),
                })
            })
            .collect();
        return print(out, &json!({ "tables": tables }));
    }
    let rows: Vec<Vec<String>> = tables
        .iter()
        .map(|t| {
            vec![
                t.parent.clone(),
                humantime::format_duration(t.width).to_string(),
                humantime::format_duration(t.retention).to_string(),
                t.partitions.len().to_string(),
                t.ready_until()
                    .map_or_else(|| "none (next insert makes it)".to_owned(), time),
                t.due_for_roll_off().len().to_string(),
                format!(
                    "{:.1} MB",
                    t.partitions.iter().map(|p| p.bytes).sum::<i64>() as f64 / 1e6
                ),
            ]
        })
        .collect();
    crate::output::table(
        out,
        &[
            "TABLE",
            "WIDTH",
            "RETENTION",
            "PARTITIONS",
            "READY UNTIL",
            "DUE",
            "SIZE",
        ],
        rows,
    )
}
