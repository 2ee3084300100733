//! The SQL floor of a relay: the claim statement alone, one statement per batch, over the same
//! backlog. What a relay that writes once per message could reach, measured in the same run.

use std::time::Instant;

use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Bytea, Jsonb, Text, Timestamptz, Uuid as SqlUuid};
use waybill_outbox_core::{MessageId, OutboxMessage, Status};

use crate::common::Error;

/// The two statement shapes of REFERENCE.md: delete what is published, or mark it.
#[derive(Clone, Copy)]
pub enum Shape {
    /// `DELETE .. WHERE seq IN (SELECT .. LIMIT n FOR UPDATE SKIP LOCKED) RETURNING ..`
    Delete,
    /// `UPDATE .. SET status = 1, published_at = now() WHERE seq IN (..) RETURNING ..`
    UpdateMark,
}

// The columns a publisher needs, fetched as the relay fetches them.
#[derive(QueryableByName)]
#[allow(dead_code)]
struct Claimed {
    #[diesel(sql_type = BigInt)]
    seq: i64,
    #[diesel(sql_type = SqlUuid)]
    id: uuid::Uuid,
    #[diesel(sql_type = Text)]
    topic: String,
    #[diesel(sql_type = Text)]
    partition_key: String,
    #[diesel(sql_type = Text)]
    message_type: String,
    #[diesel(sql_type = Text)]
    content_type: String,
    #[diesel(sql_type = Bytea)]
    payload: Vec<u8>,
    #[diesel(sql_type = Jsonb)]
    headers: serde_json::Value,
    #[diesel(sql_type = Timestamptz)]
    created_at: chrono::DateTime<chrono::Utc>,
}

impl Shape {
    /// The statement taking up to `$1` pending rows in outbox order, returning what a
    /// publisher needs.
    fn statement(self) -> String {
        let verb = match self {
            Shape::Delete => "DELETE FROM outbox_messages",
            Shape::UpdateMark => "UPDATE outbox_messages SET status = 1, published_at = now()",
        };
        format!(
            "{verb} WHERE seq IN (SELECT seq FROM outbox_messages WHERE status = 0 ORDER BY seq LIMIT $1 FOR UPDATE SKIP LOCKED)
             RETURNING seq, id, topic, partition_key, message_type, content_type, payload, headers, created_at"
        )
    }
}

/// Rows per second taking `batch` pending rows per statement (autocommit) until none is left.
pub fn drain(
    conn: &mut PgConnection,
    shape: Shape,
    batch: usize,
    expected: usize,
) -> Result<f64, Error> {
    let statement = shape.statement();
    let began = Instant::now();
    let mut taken = 0;
    loop {
        let rows: Vec<Claimed> = diesel::sql_query(&statement)
            .bind::<BigInt, _>(batch as i64)
            .load(conn)?;
        if rows.is_empty() {
            break;
        }
        taken += rows.len();
    }
    let elapsed = began.elapsed();
    if taken != expected {
        return Err(format!("the floor took {taken} of {expected}").into());
    }
    Ok(taken as f64 / elapsed.as_secs_f64())
}

/// One statement of the `DELETE` floor: up to `batch` pending rows taken (deleted, so at most
/// once) and returned as the messages a publisher is handed. An empty batch: none was left.
/// It commits without waiting for the disk, as the relay's write-back does.
pub fn take(conn: &mut PgConnection, batch: usize) -> Result<Vec<OutboxMessage>, Error> {
    let rows: Vec<Claimed> = conn.transaction(|conn| {
        conn.batch_execute("SET LOCAL synchronous_commit = off")?;
        diesel::sql_query(Shape::Delete.statement())
            .bind::<BigInt, _>(batch as i64)
            .load(conn)
    })?;
    rows.into_iter()
        .map(|row| {
            let mut msg = OutboxMessage::new(row.seq, MessageId::from(row.id), Status::Pending);
            msg.topic = row.topic;
            msg.partition_key = row.partition_key;
            msg.message_type = row.message_type;
            msg.content_type = row.content_type;
            msg.payload = row.payload;
            msg.headers = serde_json::from_value(row.headers)?;
            msg.created_at = row.created_at;
            Ok(msg)
        })
        .collect()
}
