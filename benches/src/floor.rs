//! The SQL floor of a relay: the claim statement alone, one statement per batch, over the same
//! backlog. What a relay that writes once per message could reach, measured in the same run.

use std::time::Instant;

use diesel::prelude::*;
use diesel::sql_types::{BigInt, Bytea, Jsonb, Text, Uuid as SqlUuid};

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
}

/// Rows per second taking `batch` pending rows per statement (autocommit) until none is left.
pub fn drain(
    conn: &mut PgConnection,
    shape: Shape,
    batch: usize,
    expected: usize,
) -> Result<f64, Error> {
    let verb = match shape {
        Shape::Delete => "DELETE FROM outbox_messages",
        Shape::UpdateMark => "UPDATE outbox_messages SET status = 1, published_at = now()",
    };
    let statement = format!(
        "{verb} WHERE seq IN (SELECT seq FROM outbox_messages WHERE status = 0 ORDER BY seq LIMIT $1 FOR UPDATE SKIP LOCKED)
         RETURNING seq, id, topic, partition_key, message_type, content_type, payload, headers"
    );
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
