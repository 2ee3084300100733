//! The operator commands, written once for every backend.

use std::io::{BufRead, Write};
use std::str::FromStr;
use std::time::Duration;

use diesel::Connection;
use waybill_diesel::{InOrderConnection, OpsConnection};
use waybill_outbox_core::MessageId;

use crate::cli::{InboxCommand, Operation, ParkedCommand, RequeueArgs};
use crate::error::CliError;
use crate::output;

/// Runs one operator command (everything but `relay`) on `conn`.
pub(crate) fn operate<C: OpsConnection + InOrderConnection + Connection>(
    conn: &mut C,
    command: Operation,
    json: bool,
) -> Result<(), CliError> {
    let mut out = std::io::stdout().lock();
    match command {
        Operation::Status => output::status(&mut out, conn, json),
        Operation::Parked {
            command: ParkedCommand::List { limit },
        } => output::parked_list(
            &mut out,
            &waybill_diesel::parked_messages(conn, limit)?,
            json,
        ),
        Operation::Parked {
            command: ParkedCommand::Show { id },
        } => {
            let id = parse_id(&id)?;
            let message = waybill_diesel::find_message(conn, id)?
                .ok_or(waybill_diesel::Error::MessageNotFound(id))?;
            output::parked_show(&mut out, &message, json)
        }
        Operation::Requeue(args) => requeue(&mut out, conn, args),
        Operation::Skip {
            id,
            reason,
            by,
            yes,
        } => {
            let id = parse_id(&id)?;
            confirm(yes, &format!("Skip parked message {id} ({reason})?"))?;
            let by = by.unwrap_or_else(|| "waybill".to_owned());
            waybill_diesel::skip(conn, id, &reason, &by)?;
            writeln!(out, "skipped {id}")?;
            Ok(())
        }
        Operation::Purge {
            older_than,
            batch_size,
            yes,
        } => {
            let age = humantime::format_duration(older_than);
            confirm(
                yes,
                &format!("Delete published and skipped messages older than {age}?"),
            )?;
            let (published, skipped) = purge(conn, older_than, batch_size.max(1))?;
            let messages = plural(published + skipped, "message", "messages");
            writeln!(
                out,
                "purged {published} published and {skipped} skipped {messages} older than {age}"
            )?;
            Ok(())
        }
        Operation::Inbox {
            command: InboxCommand::Status { consumer },
        } => {
            let stats = waybill_diesel::inbox_stats(conn, &consumer)?;
            if stats.processed == 0 {
                // Nothing recorded: a consumer that never ran, or a typo.
                let known = waybill_diesel::inbox_consumers(conn)?;
                if !known.contains(&consumer) {
                    return Err(CliError::UnknownConsumer { consumer, known });
                }
            }
            output::inbox_status(&mut out, &stats, json)
        }
        Operation::Inbox {
            command: InboxCommand::Marks { consumer, limit },
        } => output::inbox_marks(
            &mut out,
            &waybill_diesel::inbox_marks(conn, consumer.as_deref(), limit)?,
            json,
        ),
        Operation::Inbox {
            command: InboxCommand::Gaps { consumer },
        } => output::inbox_gaps(
            &mut out,
            &waybill_diesel::inbox_gaps(conn, consumer.as_deref())?,
            json,
        ),
        Operation::RotateEpoch { yes } => {
            confirm(
                yes,
                "Draw a new producer epoch? Consumers will refuse sequence numbers that went back.",
            )?;
            let epoch = waybill_diesel::rotate_sequence_epoch(conn)?;
            writeln!(out, "new producer epoch {epoch}")?;
            Ok(())
        }
        Operation::Migrate => {
            let applied = waybill_diesel::run_migrations(conn)?;
            if applied.is_empty() {
                writeln!(out, "migrations are up to date: nothing to apply")?;
            } else {
                let count = applied.len();
                let noun = plural(count as u64, "migration", "migrations");
                writeln!(out, "applied {count} {noun}:")?;
                for name in applied {
                    writeln!(out, "  {name}")?;
                }
            }
            Ok(())
        }
        // Dispatched before a backend is chosen (PostgreSQL only): see `db::run`.
        Operation::Partitions { .. } => Err(CliError::Usage(
            "partitions are a PostgreSQL layout".to_owned(),
        )),
    }
}

fn requeue<C: OpsConnection>(
    out: &mut impl Write,
    conn: &mut C,
    args: RequeueArgs,
) -> Result<(), CliError> {
    let requeued = if let Some(id) = args.id {
        let id = parse_id(&id)?;
        confirm(args.yes, &format!("Requeue parked message {id}?"))?;
        if !waybill_diesel::requeue(conn, id)? {
            // Said as `parked show` says it: missing, or there but not parked.
            let message = waybill_diesel::find_message(conn, id)?
                .ok_or(waybill_diesel::Error::MessageNotFound(id))?;
            return Err(CliError::NotParked {
                id: id.to_string(),
                status: format!("{:?}", message.status).to_lowercase(),
            });
        }
        1
    } else if let Some(key) = args.key {
        confirm(
            args.yes,
            &format!("Requeue every parked message of key {key:?}?"),
        )?;
        waybill_diesel::requeue_key(conn, &key)?
    } else {
        confirm(args.yes, "Requeue EVERY parked message?")?;
        waybill_diesel::requeue_all_parked(conn)?
    };
    let messages = plural(requeued, "message", "messages");
    writeln!(out, "requeued {requeued} {messages}")?;
    Ok(())
}

/// Deletes in bounded batches until a batch comes back short.
fn purge<C: OpsConnection>(
    conn: &mut C,
    older_than: Duration,
    batch: usize,
) -> Result<(u64, u64), CliError> {
    let mut published = 0;
    loop {
        let deleted = conn.purge_published_messages(older_than, batch)?;
        published += deleted;
        if deleted < batch as u64 {
            break;
        }
    }
    let mut skipped = 0;
    loop {
        let deleted = waybill_diesel::purge_skipped(conn, older_than, batch)?;
        skipped += deleted;
        if deleted < batch as u64 {
            break;
        }
    }
    Ok((published, skipped))
}

/// `one` for 1, else `many`.
pub(crate) fn plural(count: u64, one: &'static str, many: &'static str) -> &'static str {
    if count == 1 {
        one
    } else {
        many
    }
}

fn parse_id(text: &str) -> Result<MessageId, CliError> {
    MessageId::from_str(text.trim()).map_err(|_| CliError::InvalidId(text.to_owned()))
}

/// Asks `question [y/N]` on stderr and reads the answer from stdin, unless `yes`.
pub(crate) fn confirm(yes: bool, question: &str) -> Result<(), CliError> {
    if yes {
        return Ok(());
    }
    let mut err = std::io::stderr().lock();
    write!(err, "{question} [y/N] ")?;
    err.flush()?;
    let mut answer = String::new();
    std::io::stdin().lock().read_line(&mut answer)?;
    match answer.trim().to_ascii_lowercase().as_str() {
        "y" | "yes" => Ok(()),
        _ => Err(CliError::Aborted),
    }
}

#[cfg(test)]
mod tests {
    use super::plural;

    #[test]
    fn one_is_singular_and_every_other_count_plural() {
        assert_eq!(plural(1, "message", "messages"), "message");
        for count in [0, 2, 11] {
            assert_eq!(plural(count, "relay", "relays"), "relays");
        }
    }
}
