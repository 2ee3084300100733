//! Tables for people and JSON for scripts.

use std::io::Write;

use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::{json, Value};
use waybill_diesel::{GapEntry, InboxStats, MarkEntry, OpsConnection, ParkedMessage, RelayLease};
use waybill_outbox_core::OutboxMessage;

use crate::error::CliError;

/// Bytes of payload `parked show` prints.
const PREVIEW_BYTES: usize = 1024;

/// `status`: one row per topic.
pub(crate) fn status<C: OpsConnection>(
    out: &mut impl Write,
    conn: &mut C,
    json: bool,
) -> Result<(), CliError> {
    let stats = waybill_diesel::topic_stats(conn)?;
    let leases = waybill_diesel::relay_leases(conn)?;
    let now = waybill_diesel::outbox_clock(conn)?;
    let leases_of = |topic: &str| -> Vec<&RelayLease> {
        leases.iter().filter(|lease| lease.topic == topic).collect()
    };
    let age = |oldest: Option<DateTime<Utc>>| {
        oldest.map(|at| ((now - at).num_milliseconds().max(0) as f64) / 1000.0)
    };
    if json {
        let topics: Vec<Value> = stats
            .iter()
            .map(|s| {
                let relays: Vec<Value> = leases_of(&s.topic)
                    .iter()
                    .map(|l| json!({"owner": l.owner, "messages": l.messages, "lease_until": rfc3339(l.until)}))
                    .collect();
                json!({
                    "topic": s.topic,
                    "pending": s.pending,
                    "parked": s.parked,
                    "published": s.published,
                    "oldest_pending_age_s": age(s.oldest_pending),
                    "oldest_pending_at": s.oldest_pending.map(rfc3339),
                    "relays": relays,
                })
            })
            .collect();
        return print_json(out, &json!({ "topics": topics }));
    }
    if stats.is_empty() {
        writeln!(out, "the outbox is empty")?;
        return Ok(());
    }
    let rows = stats
        .iter()
        .map(|s| {
            let relays: Vec<String> = leases_of(&s.topic)
                .iter()
                .map(|l| format!("{} ({})", l.owner, l.messages))
                .collect();
            vec![
                s.topic.clone(),
                s.pending.to_string(),
                s.parked.to_string(),
                s.published.to_string(),
                age(s.oldest_pending).map_or_else(|| "-".to_owned(), seconds),
                if relays.is_empty() {
                    "-".to_owned()
                } else {
                    relays.join(", ")
                },
            ]
        })
        .collect();
    table(
        out,
        &[
            "TOPIC",
            "PENDING",
            "PARKED",
            "PUBLISHED",
            "OLDEST PENDING",
            "RELAYS (LEASED)",
        ],
        rows,
    )
}

/// `parked list`.
pub(crate) fn parked_list(
    out: &mut impl Write,
    parked: &[ParkedMessage],
    json: bool,
) -> Result<(), CliError> {
    if json {
        let items: Vec<Value> = parked
            .iter()
            .map(|p| {
                json!({
                    "id": p.id.to_string(),
                    "topic": p.topic,
                    "partition_key": p.partition_key,
                    "message_type": p.message_type,
                    "attempts": p.attempts,
                    "last_error": p.last_error,
                    "created_at": rfc3339(p.created_at),
                })
            })
            .collect();
        return print_json(out, &json!({ "parked": items }));
    }
    if parked.is_empty() {
        writeln!(out, "no parked messages")?;
        return Ok(());
    }
    let rows = parked
        .iter()
        .map(|p| {
            vec![
                p.id.to_string(),
                p.topic.clone(),
                p.partition_key.clone(),
                p.message_type.clone(),
                p.attempts.to_string(),
                rfc3339(p.created_at),
                shorten(p.last_error.as_deref().unwrap_or("-"), 60),
            ]
        })
        .collect();
    table(
        out,
        &[
            "ID",
            "TOPIC",
            "KEY",
            "TYPE",
            "ATTEMPTS",
            "ENQUEUED",
            "LAST ERROR",
        ],
        rows,
    )
}

/// `parked show <id>`.
pub(crate) fn parked_show(
    out: &mut impl Write,
    message: &OutboxMessage,
    json: bool,
) -> Result<(), CliError> {
    let status = format!("{:?}", message.status).to_lowercase();
    let preview = preview(&message.payload);
    if json {
        return print_json(
            out,
            &json!({
                "id": message.id.to_string(),
                "topic": message.topic,
                "partition_key": message.partition_key,
                "message_type": message.message_type,
                "content_type": message.content_type,
                "status": status,
                "attempts": message.attempts,
                "last_error": message.last_error,
                "created_at": rfc3339(message.created_at),
                "headers": message.headers,
                "payload_bytes": message.payload.len(),
                "payload_preview": preview,
            }),
        );
    }
    let headers: Vec<String> = message
        .headers
        .iter()
        .map(|(name, value)| format!("{name}={value}"))
        .collect();
    let fields = [
        ("id", message.id.to_string()),
        ("topic", message.topic.clone()),
        ("partition key", message.partition_key.clone()),
        ("type", message.message_type.clone()),
        ("content type", message.content_type.clone()),
        ("status", status),
        ("attempts", message.attempts.to_string()),
        ("enqueued", rfc3339(message.created_at)),
        (
            "last error",
            message.last_error.clone().unwrap_or_else(|| "-".to_owned()),
        ),
        ("headers", headers.join(", ")),
    ];
    for (name, value) in fields {
        writeln!(out, "{:<14} {value}", format!("{name}:"))?;
    }
    let bytes = message.payload.len();
    let unit = crate::operate::plural(bytes as u64, "byte", "bytes");
    writeln!(out, "payload ({bytes} {unit}):")?;
    writeln!(out, "{preview}")?;
    Ok(())
}

/// `inbox status --consumer C`.
pub(crate) fn inbox_status(
    out: &mut impl Write,
    stats: &InboxStats,
    json: bool,
) -> Result<(), CliError> {
    if json {
        return print_json(
            out,
            &json!({
                "consumer": stats.consumer,
                "processed": stats.processed,
                "oldest_processed_at": stats.oldest.map(rfc3339),
                "newest_processed_at": stats.newest.map(rfc3339),
            }),
        );
    }
    let time = |at: Option<DateTime<Utc>>| at.map_or_else(|| "-".to_owned(), rfc3339);
    table(
        out,
        &["CONSUMER", "PROCESSED", "OLDEST", "NEWEST"],
        vec![vec![
            stats.consumer.clone(),
            stats.processed.to_string(),
            time(stats.oldest),
            time(stats.newest),
        ]],
    )
}

/// `inbox marks`: one row per consumer and sequenced key.
pub(crate) fn inbox_marks(
    out: &mut impl Write,
    marks: &[MarkEntry],
    json: bool,
) -> Result<(), CliError> {
    if json {
        let marks: Vec<Value> = marks
            .iter()
            .map(|m| {
                json!({
                    "consumer": m.consumer,
                    "source": m.source,
                    "topic": m.topic,
                    "partition_key": m.partition_key,
                    "last_sequence": m.last_sequence,
                    "epoch": m.epoch,
                    "updated_at": rfc3339(m.updated_at),
                })
            })
            .collect();
        return print_json(out, &json!({ "marks": marks }));
    }
    if marks.is_empty() {
        writeln!(out, "no sequenced messages applied yet")?;
        return Ok(());
    }
    table(
        out,
        &["CONSUMER", "SOURCE", "TOPIC", "KEY", "LAST", "UPDATED"],
        marks
            .iter()
            .map(|m| {
                vec![
                    m.consumer.clone(),
                    m.source.clone(),
                    m.topic.clone(),
                    m.partition_key.clone(),
                    m.last_sequence.to_string(),
                    rfc3339(m.updated_at),
                ]
            })
            .collect(),
    )
}

/// `inbox gaps`: messages held back or parked behind a gap.
pub(crate) fn inbox_gaps(
    out: &mut impl Write,
    gaps: &[GapEntry],
    json: bool,
) -> Result<(), CliError> {
    if json {
        let gaps: Vec<Value> = gaps
            .iter()
            .map(|g| {
                json!({
                    "consumer": g.consumer,
                    "source": g.source,
                    "topic": g.topic,
                    "partition_key": g.partition_key,
                    "expected": g.expected,
                    "got": g.got,
                    "message_id": g.message_id,
                    "state": if g.parked { "parked" } else { "held" },
                    "first_seen_at": rfc3339(g.first_seen_at),
                    "last_seen_at": rfc3339(g.last_seen_at),
                })
            })
            .collect();
        return print_json(out, &json!({ "gaps": gaps }));
    }
    if gaps.is_empty() {
        writeln!(
            out,
            "no gaps: every consumer applied what it received in order"
        )?;
        return Ok(());
    }
    table(
        out,
        &[
            "CONSUMER", "TOPIC", "KEY", "EXPECTED", "GOT", "STATE", "MESSAGE", "SINCE",
        ],
        gaps.iter()
            .map(|g| {
                vec![
                    g.consumer.clone(),
                    g.topic.clone(),
                    g.partition_key.clone(),
                    g.expected.to_string(),
                    g.got.to_string(),
                    if g.parked { "parked" } else { "held" }.to_owned(),
                    g.message_id.clone(),
                    rfc3339(g.first_seen_at),
                ]
            })
            .collect(),
    )
}

fn print_json(out: &mut impl Write, value: &Value) -> Result<(), CliError> {
    serde_json::to_writer_pretty(&mut *out, value)?;
    writeln!(out)?;
    Ok(())
}

/// Left-aligned columns, two spaces apart.
pub(crate) fn table(
    out: &mut impl Write,
    headers: &[&str],
    rows: Vec<Vec<String>>,
) -> Result<(), CliError> {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let header: Vec<String> = headers.iter().map(|h| (*h).to_owned()).collect();
    for row in std::iter::once(header).chain(rows) {
        let cells: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        writeln!(out, "{}", cells.join("  ").trim_end())?;
    }
    Ok(())
}

fn rfc3339(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// An age for people: `42.3s`, `5m 12s`, `2h 3m`.
fn seconds(age: f64) -> String {
    if age < 60.0 {
        return format!("{age:.1}s");
    }
    let whole = age as u64;
    let (h, m, s) = (whole / 3600, whole % 3600 / 60, whole % 60);
    if h == 0 {
        format!("{m}m {s}s")
    } else {
        format!("{h}h {m}m")
    }
}

fn shorten(text: &str, max: usize) -> String {
    let line = text.lines().next().unwrap_or_default();
    if line.chars().count() <= max {
        return line.to_owned();
    }
    let cut: String = line.chars().take(max.saturating_sub(3)).collect();
    format!("{cut}...")
}

/// The payload's first bytes as text when they are UTF-8, else as hex.
fn preview(payload: &[u8]) -> String {
    let head = &payload[..payload.len().min(PREVIEW_BYTES)];
    let more = if payload.len() > PREVIEW_BYTES {
        " ..."
    } else {
        ""
    };
    match std::str::from_utf8(head) {
        Ok(text) => format!("{text}{more}"),
        // A multi-byte character cut at the end is still text.
        Err(e) if e.error_len().is_none() && e.valid_up_to() > 0 => {
            format!("{} ...", String::from_utf8_lossy(&head[..e.valid_up_to()]))
        }
        Err(_) => {
            let hex: Vec<String> = head.iter().map(|b| format!("{b:02x}")).collect();
            format!("hex: {}{more}", hex.join(" "))
        }
    }
}
