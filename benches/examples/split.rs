// Throwaway: where does a relay batch's time go?
use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel::r2d2::{ConnectionManager, Pool};
use std::time::{Duration, Instant};
use waybill_diesel::DieselStore;
use waybill_outbox_core::{Completion, OutboxStore, Retention};

fn main() {
    let url = "postgres://postgres@127.0.0.1:5432/test?options=-csearch_path%3Dsplit";
    PgConnection::establish("postgres://postgres@127.0.0.1:5432/test")
        .unwrap()
        .batch_execute("DROP SCHEMA IF EXISTS split CASCADE; CREATE SCHEMA split")
        .unwrap();
    let pool = Pool::builder()
        .max_size(4)
        .build(ConnectionManager::<PgConnection>::new(url))
        .unwrap();
    waybill_diesel::run_migrations(&mut *pool.get().unwrap()).unwrap();
    let batch: usize = std::env::args()
        .nth(1)
        .map(|s| s.parse().unwrap())
        .unwrap_or(1000);
    for round in 0..3 {
        pool.get().unwrap().batch_execute("TRUNCATE outbox_messages; INSERT INTO outbox_messages (id, topic, partition_key, message_type, content_type, payload) SELECT gen_random_uuid(), 'orders', 'order:' || (i % 1000), 'OrderPlaced', 'application/json', convert_to(repeat('x', 280), 'UTF8') FROM generate_series(1, 100000) AS i; ANALYZE outbox_messages;").unwrap();
        let pipelined = std::env::var("PIPE").is_ok();
        if pipelined {
            pool.get().unwrap().batch_execute("INSERT INTO outbox_relays (owner, seen_at) VALUES ('ghost', now() + interval '1 hour') ON CONFLICT (owner) DO UPDATE SET seen_at = excluded.seen_at").unwrap();
        }
        let store = std::sync::Arc::new(DieselStore::new(pool.clone()));
        let (mut tc, mut tw, mut n) = (Duration::ZERO, Duration::ZERO, 0);
        let began = Instant::now();
        let (tx, rx) = std::sync::mpsc::sync_channel::<(i64, Vec<Completion>)>(0);
        let (dtx, drx) = std::sync::mpsc::channel::<()>();
        let s2 = store.clone();
        let writer = std::thread::spawn(move || {
            let mut tw = Duration::ZERO;
            for (token, done) in rx {
                let t = Instant::now();
                s2.complete(token, &done, Retention::Delete).unwrap();
                tw += t.elapsed();
                dtx.send(()).unwrap();
            }
            tw
        });
        let mut inflight = false;
        let mut empties = 0;
        loop {
            let t0 = Instant::now();
            let claimed = store
                .claim(batch, Duration::from_secs(30), "split")
                .unwrap();
            let t1 = Instant::now();
            tc += t1 - t0;
            if claimed.messages.is_empty() {
                if inflight {
                    drx.recv().unwrap();
                    inflight = false;
                    empties += 1;
                    continue;
                }
                break;
            }
            n += claimed.messages.len();
            let done: Vec<_> = claimed
                .messages
                .iter()
                .map(|m| Completion::Published { seq: m.seq })
                .collect();
            if inflight {
                drx.recv().unwrap();
            }
            if pipelined {
                tx.send((claimed.token, done)).unwrap();
                inflight = true;
            } else {
                let t = Instant::now();
                store
                    .complete(claimed.token, &done, Retention::Delete)
                    .unwrap();
                tw += t.elapsed();
            }
        }
        drop(tx);
        tw += writer.join().unwrap();
        println!("empties {empties}");
        let el = began.elapsed();
        println!(
            "round {round}: {n} in {el:?} = {:.0}/s; claim {tc:?} complete {tw:?}",
            n as f64 / el.as_secs_f64()
        );
    }
}
