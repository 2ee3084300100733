//! The relay on every backend: several relays at once, per-key order, crashes between confirm
//! and mark, fencing of stalled relays, poison messages, broker outages, wake-ups, shutdown.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use common::{Backend, TestDb};
use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use waybill_diesel::{
    enqueue, enqueue_all, find_message, requeue, topic_stats, DieselStore, OutboxConnection,
};
use waybill_outbox_core::{
    Backoff, Claimed, Completion, InMemoryPublisher, NewOutboxMessage, OutboxMessage, OutboxStore,
    PublishError, Publisher, Relay, RelayConfig, RelayHooks, RelayReport, Retention, Status,
};

/// Liveness bound for loops that wait on leases or backoffs to pass: a test that needs it has
/// failed, it does not measure speed.
const PATIENCE: Duration = Duration::from_secs(60);

fn msg(key: &str, index: usize) -> NewOutboxMessage {
    NewOutboxMessage::bytes(
        "orders",
        key,
        "Step",
        "text/plain",
        format!("{key}|{index}"),
    )
}

fn fill<C: Backend>(db: &TestDb<C>, keys: usize, per_key: usize) -> Vec<NewOutboxMessage> {
    // Interleave keys so every batch mixes them.
    let messages: Vec<_> = (0..per_key)
        .flat_map(|i| (0..keys).map(move |k| msg(&format!("key:{k}"), i)))
        .collect();
    let mut conn = db.conn();
    for chunk in messages.chunks(1000) {
        conn.transaction(|conn| enqueue_all(conn, chunk))
            .expect("enqueue");
    }
    messages
}

fn config() -> RelayConfig {
    RelayConfig::default().batch_size(100).backoff(Backoff::new(
        Duration::from_millis(1),
        Duration::from_millis(5),
    ))
}

fn relay<C: Backend, P: Publisher>(
    db: &TestDb<C>,
    publisher: P,
    config: RelayConfig,
) -> Relay<DieselStore<C>, P> {
    Relay::new(DieselStore::new(db.pool.clone()), publisher, config)
}

fn index_of(message: &OutboxMessage) -> usize {
    let payload = String::from_utf8(message.payload.clone()).unwrap();
    payload.rsplit_once('|').unwrap().1.parse().unwrap()
}

/// Asserts that, per key, the first publication of each message follows enqueue order.
fn assert_key_order(log: &[OutboxMessage]) {
    let mut next: HashMap<&str, usize> = HashMap::new();
    let mut seen = HashSet::new();
    for message in log {
        if !seen.insert(message.id) {
            continue; // a republication after a crash or takeover: at-least-once
        }
        let expected = next.entry(message.partition_key.as_str()).or_insert(0);
        assert_eq!(
            index_of(message),
            *expected,
            "key {} published out of order",
            message.partition_key
        );
        *expected += 1;
    }
}

fn pending_and_parked<C: Backend>(db: &TestDb<C>) -> (i64, i64) {
    topic_stats(&mut db.conn())
        .unwrap()
        .iter()
        .fold((0, 0), |(p, k), s| (p + s.pending, k + s.parked))
}

/// Runs `relay` round after round until `done` holds.
fn drive<S: OutboxStore, P: Publisher>(
    relay: &mut Relay<S, P>,
    mut done: impl FnMut() -> bool,
) -> RelayReport {
    let deadline = Instant::now() + PATIENCE;
    let mut totals = RelayReport::default();
    while !done() {
        assert!(
            Instant::now() < deadline,
            "relay made no progress within {PATIENCE:?}"
        );
        let report = relay.run_once().expect("relay round");
        totals.published += report.published;
        totals.retried += report.retried;
        totals.parked += report.parked;
        totals.fenced_off += report.fenced_off;
        if report.claimed == 0 {
            std::thread::yield_now();
        }
    }
    totals
}

/// Runs `relays` on threads (`run`, or `run_pipelined` when `pipelined`) until `publisher` has
/// seen `count` messages, then stops them and returns their totals.
fn run_until_published<S, P>(
    relays: Vec<Relay<S, P>>,
    publisher: &InMemoryPublisher,
    count: usize,
    pipelined: bool,
) -> Vec<RelayReport>
where
    S: OutboxStore + Sync + Send + 'static,
    P: Publisher + Send + 'static,
{
    let handles: Vec<_> = relays.iter().map(Relay::handle).collect();
    let workers: Vec<_> = relays
        .into_iter()
        .map(|mut relay| {
            std::thread::spawn(move || {
                if pipelined {
                    relay.run_pipelined()
                } else {
                    relay.run()
                }
            })
        })
        .collect();
    assert!(
        publisher.wait_for(count, PATIENCE),
        "every message published"
    );
    handles.iter().for_each(|h| h.stop());
    workers.into_iter().map(|w| w.join().unwrap()).collect()
}

fn four_relays_publish_every_message_once_in_key_order<C: Backend>(db: TestDb<C>) {
    let messages = fill(&db, 50, 200);
    let publisher = InMemoryPublisher::new();
    let idle_poll = config()
        .min_poll_interval(Duration::from_millis(1))
        .poll_interval(Duration::from_millis(20));
    let relays: Vec<_> = (0..4)
        .map(|n| {
            relay(
                &db,
                publisher.clone(),
                idle_poll.clone().owner(format!("relay-{n}")),
            )
        })
        .collect();
    let published: u64 = run_until_published(relays, &publisher, messages.len(), false)
        .iter()
        .map(|totals| totals.published)
        .sum();
    let log = publisher.published();
    assert_eq!(
        log.len(),
        messages.len(),
        "no message lost, none published twice"
    );
    assert_eq!(published, messages.len() as u64);
    assert_eq!(
        log.iter().map(|m| m.id).collect::<HashSet<_>>().len(),
        messages.len()
    );
    assert_key_order(&log);
    assert_eq!(pending_and_parked(&db), (0, 0));
}

/// Publishes, then dies before the relay can write the outcome back.
struct CrashAfterConfirm(InMemoryPublisher);

impl Publisher for CrashAfterConfirm {
    fn publish(&mut self, batch: &[OutboxMessage]) -> Vec<Result<(), PublishError>> {
        self.0.publish(batch);
        panic!("relay killed between broker confirm and mark");
    }
}

fn crash_between_confirm_and_mark_republishes_never_loses<C: Backend>(db: TestDb<C>) {
    let messages = fill(&db, 3, 4);
    let publisher = InMemoryPublisher::new();
    let mut doomed = relay(
        &db,
        CrashAfterConfirm(publisher.clone()),
        config().lease(Duration::from_millis(1)),
    );
    let crashed = std::thread::spawn(move || doomed.run_once()).join();
    assert!(crashed.is_err(), "the first relay died");
    assert_eq!(publisher.len(), messages.len(), "the broker got the batch");
    assert_eq!(
        pending_and_parked(&db),
        (messages.len() as i64, 0),
        "nothing was marked"
    );

    let mut survivor = relay(&db, publisher.clone(), config());
    drive(&mut survivor, || pending_and_parked(&db) == (0, 0));
    let log = publisher.published();
    assert_eq!(
        log.len(),
        2 * messages.len(),
        "republished after the lease expired: at-least-once"
    );
    assert_key_order(&log);
}

/// Blocks in `publish` until the test lets it go, then reports `outcome` for every message.
struct Stalling {
    inner: InMemoryPublisher,
    entered: mpsc::Sender<()>,
    resume: mpsc::Receiver<()>,
    outcome: Result<(), PublishError>,
}

impl Stalling {
    /// A publisher that signals on `entered` when a batch arrives and waits for `resume`.
    fn new(
        inner: InMemoryPublisher,
        outcome: Result<(), PublishError>,
    ) -> (Self, mpsc::Receiver<()>, mpsc::Sender<()>) {
        let (entered, entered_rx) = mpsc::channel();
        let (resume_tx, resume) = mpsc::channel();
        let stalling = Self {
            inner,
            entered,
            resume,
            outcome,
        };
        (stalling, entered_rx, resume_tx)
    }
}

impl Publisher for Stalling {
    fn publish(&mut self, batch: &[OutboxMessage]) -> Vec<Result<(), PublishError>> {
        self.entered.send(()).unwrap();
        self.resume.recv().unwrap();
        if self.outcome.is_ok() {
            self.inner.publish(batch);
        }
        vec![self.outcome.clone(); batch.len()]
    }
}

fn stalled_relay_is_fenced_off_after_takeover<C: Backend>(db: TestDb<C>) {
    for outcome in [Ok(()), Err(PublishError::Retryable("late failure".into()))] {
        let messages = fill(&db, 2, 3);
        let publisher = InMemoryPublisher::new();
        let (stalling, entered, resume) = Stalling::new(publisher.clone(), outcome);
        let mut stalled = relay(
            &db,
            stalling,
            config().lease(Duration::from_millis(1)).owner("stalled"),
        );
        let worker = std::thread::spawn(move || stalled.run_once().unwrap());
        entered.recv().unwrap();

        // The lease runs out while the first relay is stuck; another relay takes over.
        let mut rescuer = relay(&db, publisher.clone(), config().owner("rescuer"));
        drive(&mut rescuer, || pending_and_parked(&db) == (0, 0));
        assert!(
            rescuer.totals().lease_takeovers >= 1,
            "the rescuer took the stalled relay's lease over"
        );
        resume.send(()).unwrap();
        let late = worker.join().unwrap();
        assert_eq!(late.claimed, messages.len() as u64);
        assert_eq!(
            late.fenced_off,
            messages.len() as u64,
            "every late write was refused"
        );
        assert_eq!(
            pending_and_parked(&db),
            (0, 0),
            "the late relay changed nothing"
        );
        for message in &messages {
            assert_eq!(
                find_message(&mut db.conn(), message.id()).unwrap(),
                None,
                "published and deleted"
            );
        }
    }
}

fn poison_message_is_parked_its_key_waits_and_requeue_releases_it<C: Backend>(db: TestDb<C>) {
    let messages = fill(&db, 50, 4);
    let poison = messages
        .iter()
        .find(|m| m.partition_key() == "key:7" && m.payload() == b"key:7|1")
        .unwrap()
        .id();
    let broken = Arc::new(AtomicBool::new(true));
    let fault = broken.clone();
    let publisher = InMemoryPublisher::new().with_fault(move |m| {
        (m.id == poison && fault.load(Ordering::SeqCst))
            .then(|| PublishError::Retryable("rejected".into()))
    });
    let mut relay = relay(&db, publisher.clone(), config().max_attempts(3));
    let totals = drive(&mut relay, || pending_and_parked(&db) == (2, 1));
    assert_eq!(totals.parked, 1);
    assert_eq!(
        totals.retried, 2,
        "two retries, parked on the third attempt"
    );
    let parked = find_message(&mut db.conn(), poison).unwrap().unwrap();
    assert_eq!(parked.status, Status::Parked);
    assert_eq!(parked.attempts, 3);
    assert!(parked.last_error.unwrap().contains("rejected"));
    let key7: Vec<usize> = publisher
        .published()
        .iter()
        .filter(|m| m.partition_key == "key:7")
        .map(index_of)
        .collect();
    assert_eq!(key7, vec![0], "the messages behind the poison one wait");
    assert_eq!(
        relay.run_once().unwrap().claimed,
        0,
        "nothing of key:7 is claimable"
    );

    broken.store(false, Ordering::SeqCst);
    assert!(requeue(&mut db.conn(), poison).unwrap());
    drive(&mut relay, || pending_and_parked(&db) == (0, 0));
    assert_eq!(publisher.len(), messages.len());
    assert_key_order(&publisher.published());
}

fn retryable_failures_back_off_each_key_then_drain_everything<C: Backend>(db: TestDb<C>) {
    let messages = fill(&db, 5, 10);
    let down = Arc::new(AtomicBool::new(true));
    let fault = down.clone();
    let publisher = InMemoryPublisher::new().with_fault(move |_| {
        fault
            .load(Ordering::SeqCst)
            .then(|| PublishError::Retryable("negatively confirmed".into()))
    });
    let mut relay = relay(
        &db,
        publisher.clone(),
        config().batch_size(1000).backoff(Backoff::new(
            Duration::from_secs(3600),
            Duration::from_secs(3600),
        )),
    );
    let report = relay.run_once().unwrap();
    assert_eq!(report.retried, 5, "the head of each key failed");
    assert_eq!(report.published + report.parked, 0);
    let first = find_message(&mut db.conn(), messages[0].id())
        .unwrap()
        .unwrap();
    assert_eq!(first.attempts, 1);
    assert_eq!(first.last_error.as_deref(), Some("negatively confirmed"));
    assert!(
        first.available_at > chrono::Utc::now() + chrono::Duration::minutes(20),
        "backed off"
    );
    assert_eq!(
        relay.run_once().unwrap().claimed,
        0,
        "every key waits for its backoff"
    );

    down.store(false, Ordering::SeqCst);
    db.conn()
        .batch_execute("UPDATE outbox_messages SET available_at = created_at")
        .unwrap();
    drive(&mut relay, || pending_and_parked(&db) == (0, 0));
    assert_eq!(publisher.len(), messages.len(), "nothing lost");
    assert_key_order(&publisher.published());
}

fn broker_outage_longer_than_the_retry_budget_parks_nothing<C: Backend>(db: TestDb<C>) {
    let messages = fill(&db, 5, 10);
    let down = Arc::new(AtomicBool::new(true));
    let fault = down.clone();
    let publisher = InMemoryPublisher::new().with_fault(move |_| {
        fault
            .load(Ordering::SeqCst)
            .then(|| PublishError::Unavailable("connection refused".into()))
    });
    let max_attempts = 3;
    let mut relay = relay(
        &db,
        publisher.clone(),
        config().batch_size(1000).max_attempts(max_attempts),
    );
    for round in 0..4 * max_attempts {
        let report = relay.run_once().unwrap();
        assert_eq!(
            report.claimed,
            messages.len() as u64,
            "round {round}: every message is claimable again at once"
        );
        assert_eq!(report.unavailable, 5, "round {round}: the head of each key");
        assert_eq!(report.released, 45, "round {round}: the rest of each key");
        assert_eq!(report.published + report.retried + report.parked, 0);
    }
    assert_eq!(pending_and_parked(&db), (messages.len() as i64, 0));
    for message in &messages {
        let stored = find_message(&mut db.conn(), message.id()).unwrap().unwrap();
        assert_eq!(stored.attempts, 0, "an outage charges no attempt");
        assert_eq!(stored.status, Status::Pending);
    }

    down.store(false, Ordering::SeqCst);
    let totals = drive(&mut relay, || pending_and_parked(&db) == (0, 0));
    assert_eq!(totals.retried + totals.parked, 0);
    let log = publisher.published();
    assert_eq!(log.len(), messages.len(), "each message published once");
    assert_key_order(&log);
}

fn running_relays_wait_out_a_broker_outage_and_park_nothing<C: Backend>(db: TestDb<C>) {
    for pipelined in [false, true] {
        let messages = fill(&db, 5, 10);
        let max_attempts = 3;
        // Down for as many publish attempts as twenty times every key's retry budget: counted,
        // not timed, so the test does not depend on the machine's speed.
        let outage = 20 * max_attempts as usize * 5;
        let refusals = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = refusals.clone();
        let publisher = InMemoryPublisher::new().with_fault(move |_| {
            (counter.fetch_add(1, Ordering::SeqCst) < outage)
                .then(|| PublishError::Unavailable("connection refused".into()))
        });
        let relay = relay(&db, publisher.clone(), config().max_attempts(max_attempts));
        let totals = run_until_published(vec![relay], &publisher, messages.len(), pipelined);
        assert!(
            refusals.load(Ordering::SeqCst) > outage,
            "pipelined={pipelined}"
        );
        assert_eq!(
            totals[0].unavailable, outage as u64,
            "pipelined={pipelined}"
        );
        assert_eq!(
            totals[0].parked + totals[0].retried,
            0,
            "pipelined={pipelined}: no attempt was charged"
        );
        assert_eq!(pending_and_parked(&db), (0, 0), "pipelined={pipelined}");
        let log = publisher.published();
        assert_eq!(
            log.len(),
            messages.len(),
            "pipelined={pipelined}: each once"
        );
        assert_key_order(&log);
    }
}

fn delayed_message_holds_back_only_its_key<C: Backend>(db: TestDb<C>) {
    let later = chrono::Utc::now() + chrono::Duration::hours(1);
    let mut conn = db.conn();
    enqueue(&mut conn, &msg("a", 0).available_at(later)).unwrap();
    enqueue(&mut conn, &msg("a", 1)).unwrap();
    enqueue(&mut conn, &msg("b", 0)).unwrap();
    let publisher = InMemoryPublisher::new();
    let mut relay = relay(&db, publisher.clone(), config());
    assert_eq!(relay.run_once().unwrap().published, 1);
    assert_eq!(publisher.published()[0].partition_key, "b");
    assert_eq!(relay.run_once().unwrap().claimed, 0);
}

fn unreadable_row_is_parked_and_others_flow<C: Backend>(db: TestDb<C>) {
    let messages = fill(&db, 3, 2);
    db.conn()
        .batch_execute(
            "UPDATE outbox_messages SET headers = '[1, 2]' WHERE partition_key = 'key:1'",
        )
        .unwrap();
    let publisher = InMemoryPublisher::new();
    let mut relay = relay(&db, publisher.clone(), config());
    drive(&mut relay, || pending_and_parked(&db).0 == 0);
    assert_eq!(publisher.len(), 4);
    assert_eq!(pending_and_parked(&db), (0, 2));
    let bad = find_message(&mut db.conn(), messages[1].id());
    assert!(
        bad.is_err(),
        "still unreadable, and reported as such: {bad:?}"
    );
}

/// A row that cannot be read is parked inside the claim; a later message of its key in the same
/// claim must wait behind it, or it goes out first and the key's order breaks once an operator
/// fixes and requeues the unreadable one.
fn an_unreadable_row_holds_back_the_rest_of_its_key<C: Backend>(db: TestDb<C>) {
    let (first, second, other) = (msg("k", 0), msg("k", 1), msg("j", 0));
    let mut conn = db.conn();
    enqueue(&mut *conn, &first).unwrap();
    // Valid JSON, not a string map: written by SQL, another language or a newer version.
    conn.batch_execute("UPDATE outbox_messages SET headers = '[1, 2]' WHERE partition_key = 'k'")
        .unwrap();
    enqueue(&mut *conn, &second).unwrap();
    enqueue(&mut *conn, &other).unwrap();
    let publisher = InMemoryPublisher::new();
    let mut relay = relay(&db, publisher.clone(), config());
    let report = relay.run_once().unwrap();
    let keys: Vec<String> = publisher
        .published()
        .iter()
        .map(|m| m.partition_key.clone())
        .collect();
    assert_eq!(keys, ["j"], "k's second message waits behind its first");
    assert_eq!(report.claimed, 1);
    assert_eq!(pending_and_parked(&db), (1, 1));
    assert_eq!(relay.run_once().unwrap().claimed, 0, "k stays blocked");
    conn.batch_execute(
        "UPDATE outbox_messages SET headers = '{}' WHERE partition_key = 'k' AND status = 2",
    )
    .unwrap();
    assert!(requeue(&mut *conn, first.id()).unwrap());
    drive(&mut relay, || pending_and_parked(&db) == (0, 0));
    let of_k: Vec<usize> = publisher
        .published()
        .iter()
        .filter(|m| m.partition_key == "k")
        .map(index_of)
        .collect();
    assert_eq!(of_k, [0, 1], "k goes out First, Second");
}

/// A key bucket whose lease row is gone (deleted by hand, a partial restore) could not be
/// leased: claims handed its messages to every relay at once, and their write-backs were
/// refused, so they went out again and again. Claims restore the row (SQLite's claims failed
/// for good instead).
fn a_missing_lease_row_never_hands_out_an_unleased_message<C: Backend>(db: TestDb<C>) {
    let messages = fill(&db, 8, 5);
    db.conn()
        .batch_execute("DELETE FROM outbox_relay_leases")
        .unwrap();
    let lease = Duration::from_secs(60);
    let (mut a, mut b) = (db.conn(), db.conn());
    let held = a.claim_outbox_messages(10, lease, "a", 0).unwrap();
    assert!(!held.messages.is_empty(), "a claim finds the backlog");
    let other = b.claim_outbox_messages(10, lease, "b", 0).unwrap();
    let held_keys: HashSet<&str> = held
        .messages
        .iter()
        .map(|m| m.partition_key.as_str())
        .collect();
    assert!(
        other
            .messages
            .iter()
            .all(|m| !held_keys.contains(m.partition_key.as_str())),
        "b was handed keys a holds: {:?} and {:?}",
        seqs_of(&held),
        seqs_of(&other)
    );
    let mut sent: Vec<_> = held
        .messages
        .iter()
        .chain(&other.messages)
        .map(|m| m.id)
        .collect();
    for (conn, claimed) in [(&mut a, &held), (&mut b, &other)] {
        let done = each(claimed, published);
        let report = conn
            .complete_outbox_messages(claimed.token, &done, Retention::Delete)
            .unwrap();
        assert_eq!(report.refused, 0, "the claim's leases hold");
    }
    // Gone again before two relays take turns on the rest.
    db.conn()
        .batch_execute("DELETE FROM outbox_relay_leases")
        .unwrap();
    let publisher = InMemoryPublisher::new();
    let mut relays = [
        relay(&db, publisher.clone(), config().batch_size(4).owner("r1")),
        relay(&db, publisher.clone(), config().batch_size(4).owner("r2")),
    ];
    let deadline = Instant::now() + PATIENCE;
    while pending_and_parked(&db).0 > 0 {
        assert!(Instant::now() < deadline, "every message is published");
        for relay in &mut relays {
            assert_eq!(relay.run_once().unwrap().fenced_off, 0);
        }
    }
    sent.extend(publisher.published().iter().map(|m| m.id));
    let unique: HashSet<_> = sent.iter().copied().collect();
    assert_eq!(sent.len(), unique.len(), "no message published twice");
    assert_eq!(unique, messages.iter().map(|m| m.id()).collect());
}

struct IdleSignal(mpsc::Sender<()>);

impl RelayHooks for IdleSignal {
    fn on_idle(&self) {
        let _ = self.0.send(());
    }
}

/// An idle relay with an hour-long poll interval publishes a new message: only a wake-up can
/// have made it look.
fn wake_up_reaches_an_idle_relay<C: Backend>(db: TestDb<C>, by_notify: bool) {
    let publisher = InMemoryPublisher::new();
    let (idle_tx, idle) = mpsc::channel();
    let hour = Duration::from_secs(3600);
    let mut relay = relay(
        &db,
        publisher.clone(),
        config().poll_interval(hour).min_poll_interval(hour),
    )
    .with_hooks(IdleSignal(idle_tx));
    let handle = relay.handle();
    let worker = std::thread::spawn(move || relay.run());
    // The relay listens before its first claim, so once it is idle no wake-up can be missed.
    idle.recv().unwrap();
    enqueue(&mut db.conn(), &msg("a", 0)).unwrap();
    if !by_notify {
        handle.wake();
    }
    assert!(publisher.wait_for(1, PATIENCE), "the idle relay was woken");
    handle.stop();
    let totals = worker.join().unwrap();
    assert_eq!(totals.published, 1);
}

fn in_process_wake_reaches_an_idle_relay<C: Backend>(db: TestDb<C>) {
    wake_up_reaches_an_idle_relay(db, false);
}

fn stop_finishes_the_batch_in_hand_and_holds_nothing<C: Backend>(db: TestDb<C>) {
    fill(&db, 4, 50);
    let publisher = InMemoryPublisher::new();
    let (stalling, entered, resume) = Stalling::new(publisher.clone(), Ok(()));
    let mut running = relay(&db, stalling, config().batch_size(50));
    let handle = running.handle();
    let worker = std::thread::spawn(move || running.run());
    entered.recv().unwrap();
    handle.stop();
    resume.send(()).unwrap();
    let totals = worker.join().unwrap();
    assert_eq!(totals.published, 50, "the batch in hand was finished");
    assert_eq!(publisher.len(), 50);

    // Stopped between claim and publish: the claim is handed back unsent.
    // One name for both relays: a relay that never ran `run` has not said it is gone, and the
    // next claims would leave it its share of the buckets for a lease period.
    let mut stopped = relay(
        &db,
        publisher.clone(),
        config().batch_size(50).owner("stopper"),
    );
    stopped.handle().stop();
    let report = stopped.run_once().unwrap();
    assert_eq!(
        (report.claimed, report.released, report.published),
        (50, 50, 0)
    );
    // Nothing is left leased: a fresh relay claims everything at once.
    let mut next = relay(
        &db,
        publisher.clone(),
        config().batch_size(1000).owner("stopper"),
    );
    assert_eq!(next.run_once().unwrap().published, 150);
    assert_key_order(&publisher.published());
}

/// Leases are per key, not per message: a relay publishes many messages of one key per batch.
fn one_key_drains_in_one_batch_in_order<C: Backend>(db: TestDb<C>) {
    fill(&db, 1, 300);
    let publisher = InMemoryPublisher::new();
    let mut relay = relay(&db, publisher.clone(), config().batch_size(1000));
    let report = relay.run_once().unwrap();
    assert_eq!((report.claimed, report.published), (300, 300));
    assert_eq!(report.lease_takeovers, 0);
    assert_key_order(&publisher.published());
}

/// With two relays at work, a claim takes only a share of the keys, so the second relay
/// finds work while the first holds a batch. SQLite has one writer and one lease: relays there
/// take turns instead.
fn a_second_relay_finds_work_while_the_first_holds_a_batch<C: Backend>(db: TestDb<C>) {
    fill(&db, 64, 5);
    let store = DieselStore::new(db.pool.clone());
    let lease = Duration::from_secs(600);
    let keys = |claimed: &waybill_outbox_core::Claimed| -> HashSet<String> {
        claimed
            .messages
            .iter()
            .map(|m| m.partition_key.clone())
            .collect()
    };
    let publish_all = |claimed: &waybill_outbox_core::Claimed| {
        let done = each(claimed, published);
        let report = store
            .complete(claimed.token, &done, Retention::Delete)
            .unwrap();
        assert_eq!(report.applied, done.len() as u64);
    };
    // Alone, relay a takes everything; relay b, arriving, finds it all leased.
    let alone = store.claim(1000, lease, "a").unwrap();
    assert_eq!(alone.messages.len(), 320);
    assert!(store.claim(1000, lease, "b").unwrap().messages.is_empty());
    store
        .complete(alone.token, &each(&alone, released), Retention::Delete)
        .unwrap();

    // Both relays are known now: each claim leaves the other keys it can take.
    let first = store.claim(1000, lease, "a").unwrap();
    let second = store.claim(1000, lease, "b").unwrap();
    if C::NAME == "sqlite" {
        assert_eq!(first.messages.len(), 320);
        assert!(second.messages.is_empty(), "one lease on SQLite");
    } else {
        assert!(!first.messages.is_empty() && first.messages.len() < 320);
        assert!(!second.messages.is_empty(), "the second relay found work");
        assert!(
            keys(&first).is_disjoint(&keys(&second)),
            "no key is held by both relays"
        );
    }
    publish_all(&second);
    publish_all(&first);
    // A relay that stops says so, and the one left takes everything again.
    store.retire("b").unwrap();
    let rest = store.claim(1000, lease, "a").unwrap();
    assert_eq!(
        first.messages.len() + second.messages.len() + rest.messages.len(),
        320
    );
    publish_all(&rest);
    assert_eq!(pending_and_parked(&db), (0, 0));
}

fn retention_keeps_published_messages_until_purged<C: Backend>(db: TestDb<C>) {
    let messages = fill(&db, 2, 5);
    let publisher = InMemoryPublisher::new();
    let window = Duration::from_secs(3600);
    let mut relay = relay(&db, publisher, config().retention(Retention::Keep(window)));
    drive(&mut relay, || pending_and_parked(&db).0 == 0);
    let kept = find_message(&mut db.conn(), messages[0].id())
        .unwrap()
        .unwrap();
    assert_eq!(kept.status, Status::Published);
    assert!(kept.published_at.is_some());
    let store = DieselStore::new(db.pool.clone());
    assert_eq!(
        store.purge_published(window, 3).unwrap(),
        0,
        "inside the window"
    );
    let mut purged = Vec::new();
    loop {
        let n = store.purge_published(Duration::ZERO, 3).unwrap();
        purged.push(n);
        if n < 3 {
            break;
        }
    }
    assert_eq!(purged, vec![3, 3, 3, 1], "bounded batches");
    assert_eq!(
        find_message(&mut db.conn(), messages[0].id()).unwrap(),
        None
    );
}

/// Pipelined relays claim the next batch while publishing the current one; with broker
/// failures forcing retries, every message still goes out once, in key order.
fn pipelined_relays_publish_every_message_once_in_key_order<C: Backend>(db: TestDb<C>) {
    let messages = fill(&db, 40, 50);
    // Every seventh message fails its first attempt: retries and held-back keys mid-pipeline.
    let failed_once = Arc::new(std::sync::Mutex::new(HashSet::new()));
    let publisher = InMemoryPublisher::new().with_fault(move |m| {
        (index_of(m) % 7 == 3 && failed_once.lock().unwrap().insert(m.id))
            .then(|| PublishError::Retryable("broker hiccup".into()))
    });
    let relays: Vec<_> = (0..2)
        .map(|n| {
            relay(
                &db,
                publisher.clone(),
                config()
                    .batch_size(50)
                    .min_poll_interval(Duration::from_millis(1))
                    .poll_interval(Duration::from_millis(20))
                    .owner(format!("pipelined-{n}")),
            )
        })
        .collect();
    let totals = run_until_published(relays, &publisher, messages.len(), true);
    let log = publisher.published();
    assert_eq!(log.len(), messages.len(), "none lost, none published twice");
    assert_eq!(
        totals.iter().map(|t| t.published).sum::<u64>(),
        messages.len() as u64
    );
    assert!(
        totals.iter().map(|t| t.retried).sum::<u64>() > 0,
        "the faults hit"
    );
    assert_key_order(&log);
    assert_eq!(pending_and_parked(&db), (0, 0));
}

/// Holds its first batch until the relay has leased a second one (`leased_batches` counts the
/// claims holding leases): proof that the pipelined relay claims while it publishes, instead of
/// quietly running claim, publish, write-back in turn.
struct WaitsForClaimAhead {
    leased_batches: Box<dyn Fn() -> i64 + Send>,
    inner: InMemoryPublisher,
    overlapped: Arc<AtomicBool>,
}

impl Publisher for WaitsForClaimAhead {
    fn publish(&mut self, batch: &[OutboxMessage]) -> Vec<Result<(), PublishError>> {
        if !self.overlapped.load(Ordering::SeqCst) {
            let deadline = Instant::now() + PATIENCE;
            while Instant::now() < deadline {
                if (self.leased_batches)() >= 2 {
                    self.overlapped.store(true, Ordering::SeqCst);
                    break;
                }
                std::thread::yield_now();
            }
        }
        self.inner.publish(batch)
    }
}

#[derive(QueryableByName)]
struct LeasedBatches {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    n: i64,
}

const LEASED_BATCHES: &str =
    "SELECT count(DISTINCT token) AS n FROM outbox_relay_leases WHERE owner IS NOT NULL";

fn pipelined_relay_claims_while_it_publishes<C: Backend>(
    db: TestDb<C>,
    leased_batches: Box<dyn Fn() -> i64 + Send>,
) {
    let messages = fill(&db, 64, 10);
    let publisher = InMemoryPublisher::new();
    let overlapped = Arc::new(AtomicBool::new(false));
    let waiting = WaitsForClaimAhead {
        leased_batches,
        inner: publisher.clone(),
        overlapped: overlapped.clone(),
    };
    let mut running = relay(&db, waiting, config().batch_size(100).owner("overlap"));
    let handle = running.handle();
    let worker = std::thread::spawn(move || running.run_pipelined());
    assert!(publisher.wait_for(messages.len(), PATIENCE));
    handle.stop();
    worker.join().unwrap();
    assert!(
        overlapped.load(Ordering::SeqCst),
        "the next batch was leased while the first was being published"
    );
    assert_key_order(&publisher.published());
}

/// A pipelined relay told to stop hands back the batch it claimed ahead and holds no lease:
/// a fresh relay claims everything that is left at once.
fn pipelined_relay_stops_holding_nothing<C: Backend>(db: TestDb<C>) {
    fill(&db, 8, 25);
    let publisher = InMemoryPublisher::new();
    let (stalling, entered, resume) = Stalling::new(publisher.clone(), Ok(()));
    let mut running = relay(&db, stalling, config().batch_size(50).owner("pipe-stop"));
    let handle = running.handle();
    let worker = std::thread::spawn(move || running.run_pipelined());
    entered.recv().unwrap();
    handle.stop();
    resume.send(()).unwrap();
    let totals = worker.join().unwrap();
    assert_eq!(totals.published, publisher.len() as u64);
    assert!(totals.published > 0, "the batch in hand was finished");
    let mut next = relay(
        &db,
        publisher.clone(),
        config().batch_size(1000).owner("pipe-stop"),
    );
    let report = next.run_once().unwrap();
    assert_eq!(
        report.published + totals.published,
        200,
        "nothing left leased"
    );
    assert_key_order(&publisher.published());
    assert_eq!(pending_and_parked(&db), (0, 0));
}

backend_tests!(
    four_relays_publish_every_message_once_in_key_order,
    crash_between_confirm_and_mark_republishes_never_loses,
    stalled_relay_is_fenced_off_after_takeover,
    poison_message_is_parked_its_key_waits_and_requeue_releases_it,
    retryable_failures_back_off_each_key_then_drain_everything,
    broker_outage_longer_than_the_retry_budget_parks_nothing,
    running_relays_wait_out_a_broker_outage_and_park_nothing,
    delayed_message_holds_back_only_its_key,
    unreadable_row_is_parked_and_others_flow,
    an_unreadable_row_holds_back_the_rest_of_its_key,
    a_missing_lease_row_never_hands_out_an_unleased_message,
    in_process_wake_reaches_an_idle_relay,
    stop_finishes_the_batch_in_hand_and_holds_nothing,
    retention_keeps_published_messages_until_purged,
    one_key_drains_in_one_batch_in_order,
    a_second_relay_finds_work_while_the_first_holds_a_batch,
    pipelined_relays_publish_every_message_once_in_key_order,
    pipelined_relay_stops_holding_nothing,
);

#[cfg(feature = "postgres")]
#[test]
fn notify_from_the_enqueueing_transaction_wakes_an_idle_relay() {
    if let Some(db) = common::postgres() {
        wake_up_reaches_an_idle_relay(db, true);
    }
}

/// Writers notify only while a relay waits idle: NOTIFY takes a database-wide lock at commit.
#[cfg(feature = "postgres")]
#[test]
fn writers_are_asked_for_wake_ups_only_while_a_relay_waits() {
    #[derive(QueryableByName)]
    struct Flag {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        token: i64,
    }
    let Some(db) = common::postgres() else { return };
    let flag = || -> i64 {
        diesel::sql_query(
            "SELECT coalesce(pg_sequence_last_value('outbox_relay_wakeup'), 0) AS token",
        )
        .get_result::<Flag>(&mut db.conn())
        .unwrap()
        .token
    };
    assert_eq!(flag(), 0, "no relay waits yet");
    let (idle_tx, idle) = mpsc::channel();
    let hour = Duration::from_secs(3600);
    let mut relay = relay(
        &db,
        InMemoryPublisher::new(),
        config().poll_interval(hour).min_poll_interval(hour),
    )
    .with_hooks(IdleSignal(idle_tx));
    let handle = relay.handle();
    let worker = std::thread::spawn(move || relay.run());
    idle.recv().unwrap();
    assert_eq!(flag(), 1, "an idle relay asks for wake-ups");
    handle.stop();
    worker.join().unwrap();
    assert_eq!(flag(), 0, "a stopped relay withdraws the request");
}

/// The claim and completion statements run on every batch: planning them each time cost about
/// a third of a millisecond per statement, so they must stay prepared on the connection.
#[cfg(feature = "postgres")]
#[test]
fn claim_and_complete_reuse_prepared_statements() {
    #[derive(QueryableByName)]
    struct Count {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        count: i64,
    }
    let Some(db) = common::postgres() else { return };
    fill(&db, 3, 2);
    let mut conn = db.conn();
    let prepared = |conn: &mut PgConnection| -> i64 {
        diesel::sql_query(
            "SELECT count(*) AS count FROM pg_prepared_statements \
             WHERE statement LIKE '%outbox%'",
        )
        .get_result::<Count>(conn)
        .unwrap()
        .count
    };
    let round = |conn: &mut PgConnection| {
        let claimed = conn
            .claim_outbox_messages(2, Duration::from_secs(30), "prepared-test", 0)
            .unwrap();
        assert!(!claimed.messages.is_empty(), "a claim finds the backlog");
        let done = each(&claimed, published);
        let report = conn
            .complete_outbox_messages(claimed.token, &done, Retention::Delete)
            .unwrap();
        assert_eq!(report.applied, done.len() as u64);
    };
    round(&mut conn);
    let after_first = prepared(&mut conn);
    // Open the claim, candidates, token and lease, write back.
    assert!(after_first >= 4, "only {after_first} statements prepared");
    round(&mut conn);
    assert_eq!(
        prepared(&mut conn),
        after_first,
        "the second batch prepares nothing new"
    );
}

/// Records the `seq`s of each batch it is handed, then publishes it in memory at once.
#[derive(Clone, Default)]
struct BatchLog {
    batches: Arc<std::sync::Mutex<Vec<Vec<i64>>>>,
    inner: InMemoryPublisher,
}

impl Publisher for BatchLog {
    fn publish(&mut self, batch: &[OutboxMessage]) -> Vec<Result<(), PublishError>> {
        self.batches
            .lock()
            .unwrap()
            .push(batch.iter().map(|m| m.seq).collect());
        self.inner.publish(batch)
    }
}

/// With a publisher that takes no time, claiming ahead hides nothing and costs the database
/// more (a claim ahead shares the free buckets and reads its rows twice, so consecutive
/// batches interleave in `seq`): the pipelined relay measures both modes' rates and claims in
/// turn, each batch then the oldest pending messages, after the previous one. (PostgreSQL: on
/// MySQL a shared claim costs about what a whole one does, and the relay may keep either mode.)
#[cfg(feature = "postgres")]
#[test]
fn postgres_pipelined_relay_with_an_instant_publisher_claims_in_turn() {
    let Some(db) = common::postgres() else { return };
    // Batches of 200 over a backlog of 40,960: the per-message database work outweighs the
    // round trips, as in a drain, so a claim ahead's extra reads show; and the relay has
    // batches enough to measure both modes (about 60) and then run on its choice.
    let messages = fill(&db, 256, 160);
    let log = BatchLog::default();
    let mut running = relay(&db, log.clone(), config().batch_size(200).owner("in-turn"));
    let handle = running.handle();
    let worker = std::thread::spawn(move || running.run_pipelined());
    assert!(log.inner.wait_for(messages.len(), PATIENCE));
    handle.stop();
    let totals = worker.join().unwrap();
    assert_eq!(totals.published, messages.len() as u64);
    assert_key_order(&log.inner.published());
    let batches = log.batches.lock().unwrap().clone();
    assert!(batches.len() >= 200, "{} batches", batches.len());
    // A batch that starts before the previous one ends was claimed ahead, beside it.
    let interleaved: Vec<usize> = (1..batches.len())
        .filter(|&i| batches[i].first() < batches[i - 1].last())
        .collect();
    assert!(
        interleaved.first().is_some_and(|&i| i < 4),
        "the relay starts out claiming ahead: {interleaved:?}"
    );
    let decided = 80;
    let later = interleaved.iter().filter(|&&i| i >= decided).count();
    assert!(
        later * 4 <= batches.len() - decided,
        "once it has measured both modes the relay mostly claims in turn: {interleaved:?}"
    );
    assert_eq!(pending_and_parked(&db), (0, 0));
}

// SQLite has one bucket, so a pipelined relay there claims and publishes in turn.
macro_rules! claims_while_it_publishes {
    ($($name:ident: $feature:literal, $db:path;)*) => {$(
        #[cfg(feature = $feature)]
        #[test]
        fn $name() {
            if let Some(db) = $db() {
                let pool = db.pool.clone();
                let leased = move || {
                    diesel::sql_query(LEASED_BATCHES)
                        .get_result::<LeasedBatches>(&mut pool.get().unwrap())
                        .unwrap()
                        .n
                };
                pipelined_relay_claims_while_it_publishes(db, Box::new(leased));
            }
        }
    )*};
}

claims_while_it_publishes! {
    postgres_pipelined_relay_claims_while_it_publishes: "postgres", common::postgres;
    mysql_pipelined_relay_claims_while_it_publishes: "mysql", common::mysql;
}

/// A claim that finds every bucket with work leased does not walk the leased backlog in `seq`
/// order (it did, under the claim lock, so a waiting relay's polls held up the working relay's
/// claims in proportion to the backlog). `rows_read` runs the claim and counts the rows the
/// server read for it.
fn a_claim_with_every_bucket_leased_skips_the_leased_backlog<C: Backend>(
    db: TestDb<C>,
    rows_read: impl Fn(&mut C, &mut dyn FnMut(&mut C)) -> i64,
    at_most: i64,
) {
    fill(&db, 8, 500);
    let lease = Duration::from_secs(600);
    let mut holder = db.conn();
    let held = holder
        .claim_outbox_messages(10_000, lease, "holder", 0)
        .unwrap();
    assert_eq!(
        held.messages.len(),
        4000,
        "alone, the holder takes every key"
    );
    let mut claim = |conn: &mut C| {
        let claimed = conn
            .claim_outbox_messages(1000, lease, "latecomer", 0)
            .unwrap();
        assert!(claimed.messages.is_empty(), "every key with work is held");
    };
    let read = rows_read(&mut db.conn(), &mut claim);
    assert!(
        read <= at_most,
        "the claim read {read} rows; the 4,000 held messages are not its to read"
    );
}

#[cfg(feature = "postgres")]
#[test]
fn postgres_claim_with_every_bucket_leased_reads_no_message() {
    #[derive(QueryableByName)]
    struct Fetched {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        rows: i64,
    }
    let Some(db) = common::postgres() else { return };
    // The current transaction's counters of the outbox table: what the claim read, and nothing
    // else.
    let rows_read = |conn: &mut PgConnection, claim: &mut dyn FnMut(&mut PgConnection)| {
        conn.transaction::<_, diesel::result::Error, _>(|conn| {
            claim(conn);
            diesel::sql_query(
                "SELECT coalesce(seq_tup_read, 0) + coalesce(idx_tup_fetch, 0) AS rows \
                 FROM pg_stat_xact_user_tables WHERE relid = 'outbox_messages'::regclass",
            )
            .get_result::<Fetched>(conn)
        })
        .unwrap()
        .rows
    };
    a_claim_with_every_bucket_leased_skips_the_leased_backlog(db, rows_read, 0);
}

#[cfg(feature = "mysql")]
#[test]
fn mysql_claim_with_every_bucket_leased_skips_the_leased_backlog() {
    #[derive(QueryableByName)]
    struct Status {
        #[diesel(sql_type = diesel::sql_types::Text)]
        #[diesel(column_name = Value)]
        value: String,
    }
    let Some(db) = common::mysql() else { return };
    // Rows this session's handlers stepped through, in any table: the outbox walk, and the
    // 64-row lease table a few times over.
    let stepped = |conn: &mut diesel::MysqlConnection| -> i64 {
        diesel::sql_query(
            "SHOW SESSION STATUS WHERE Variable_name IN \
             ('Handler_read_next', 'Handler_read_prev', 'Handler_read_rnd_next')",
        )
        .load::<Status>(conn)
        .unwrap()
        .iter()
        .map(|s| s.value.parse::<i64>().unwrap())
        .sum()
    };
    let rows_read = |conn: &mut diesel::MysqlConnection,
                     claim: &mut dyn FnMut(&mut diesel::MysqlConnection)| {
        let before = stepped(conn);
        claim(conn);
        stepped(conn) - before
    };
    a_claim_with_every_bucket_leased_skips_the_leased_backlog(db, rows_read, 1000);
}

/// A claim that races another relay's write-back still takes a key's messages from its first
/// pending one. Relay A holds key `k`'s first message (its bucket leased); relay B claims while A
/// writes back and releases the bucket. B must take `k`'s second message before its third, or
/// neither. (On MySQL the walk's start and the walk were two reads, and a release between them
/// let B skip the second message and publish the third first. PostgreSQL reads both in one
/// statement.) The race is timing-dependent: A's write-back is started at a spread of moments
/// in B's claim, many times over.
fn a_claim_racing_a_write_back_keeps_key_order<C: Backend + Send>(db: TestDb<C>) {
    let lease = Duration::from_secs(60);
    let mut a = db.conn();
    for round in 0..300 {
        let (k, j) = (format!("k:{round}"), format!("j:{round}"));
        // Below the walk's start if A's bucket is leased when B reads where to start: j's
        // message (another bucket, almost surely) is the first free one.
        let messages = [msg(&k, 0), msg(&k, 1), msg(&j, 0), msg(&k, 2)];
        a.transaction(|conn| enqueue_all(conn, &messages)).unwrap();
        let held = a.claim_outbox_messages(1, lease, "a", 0).unwrap();
        assert_eq!(seqs_of(&held), vec![(k.clone(), 0)]);
        // With A's liveness record gone, B counts itself alone and takes every free bucket.
        a.retire_outbox_relay("a").unwrap();
        let mut b = db.conn();
        let barrier = Arc::new(std::sync::Barrier::new(2));
        let claimer = {
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                barrier.wait();
                let claimed = b.claim_outbox_messages(10, lease, "b", 0).unwrap();
                b.retire_outbox_relay("b").unwrap();
                (b, claimed)
            })
        };
        barrier.wait();
        // Spread A's write-back over the length of B's claim.
        let spin = Instant::now() + Duration::from_micros((round % 30) * 100);
        while Instant::now() < spin {
            std::hint::spin_loop();
        }
        let published = [Completion::Published {
            seq: held.messages[0].seq,
        }];
        a.complete_outbox_messages(held.token, &published, Retention::Delete)
            .unwrap();
        let (mut b, claimed) = claimer.join().unwrap();
        let of_k: Vec<usize> = seqs_of(&claimed)
            .into_iter()
            .filter(|(key, _)| *key == k)
            .map(|(_, index)| index)
            .collect();
        assert!(
            of_k.is_empty() || of_k == [1, 2],
            "round {round}: B claimed {k}'s messages {of_k:?}"
        );
        b.complete_outbox_messages(claimed.token, &each(&claimed, released), Retention::Delete)
            .unwrap();
        b.batch_execute("DELETE FROM outbox_messages").unwrap();
    }
}

/// A completion for every message of `claimed`, e.g. `Completion::Published`.
fn each(claimed: &Claimed, completion: impl Fn(i64) -> Completion) -> Vec<Completion> {
    claimed.messages.iter().map(|m| completion(m.seq)).collect()
}

fn published(seq: i64) -> Completion {
    Completion::Published { seq }
}

fn released(seq: i64) -> Completion {
    Completion::Release { seq }
}

/// Each claimed message's key and its index within the key.
fn seqs_of(claimed: &Claimed) -> Vec<(String, usize)> {
    claimed
        .messages
        .iter()
        .map(|m| (m.partition_key.clone(), index_of(m)))
        .collect()
}

#[cfg(feature = "postgres")]
#[test]
fn postgres_claim_racing_a_write_back_keeps_key_order() {
    if let Some(db) = common::postgres() {
        a_claim_racing_a_write_back_keeps_key_order(db);
    }
}

#[cfg(feature = "mysql")]
#[test]
fn mysql_claim_racing_a_write_back_keeps_key_order() {
    if let Some(db) = common::mysql() {
        a_claim_racing_a_write_back_keeps_key_order(db);
    }
}

/// Runs `op` inside a transaction that is then rolled back, and returns what it returned with
/// the `synchronous_commit` in effect after it: a transaction-local setting made by `op` stays
/// visible until the outer transaction ends.
#[cfg(feature = "postgres")]
fn with_commit_setting_after<T>(
    conn: &mut PgConnection,
    op: impl FnOnce(&mut PgConnection) -> T,
) -> (T, String) {
    #[derive(QueryableByName)]
    struct Setting {
        #[diesel(sql_type = diesel::sql_types::Text)]
        value: String,
    }
    let mut seen = None;
    let _ = conn.transaction::<(), diesel::result::Error, _>(|conn| {
        let result = op(conn);
        let setting: Setting =
            diesel::sql_query("SELECT current_setting('synchronous_commit') AS value")
                .get_result(conn)?;
        seen = Some((result, setting.value));
        Err(diesel::result::Error::RollbackTransaction)
    });
    seen.unwrap()
}

/// No claim waits for the disk, whether it leases or finds nothing; the session's own
/// `synchronous_commit` is left as it was.
#[cfg(feature = "postgres")]
#[test]
fn a_claim_does_not_wait_for_the_disk() {
    let Some(db) = common::postgres() else { return };
    let mut conn = db.conn();
    // A stricter setting than the default, which the claim relaxes for its own commit only.
    conn.batch_execute("SET synchronous_commit = remote_write")
        .unwrap();
    let in_effect_after_claim = |conn: &mut PgConnection| -> (usize, String) {
        with_commit_setting_after(conn, |conn| {
            conn.claim_outbox_messages(10, Duration::from_secs(30), "durability", 0)
                .unwrap()
                .messages
                .len()
        })
    };
    assert_eq!(in_effect_after_claim(&mut conn), (0, "off".into()));
    fill(&db, 2, 1);
    assert_eq!(in_effect_after_claim(&mut conn), (2, "off".into()));
    let ((), session) = with_commit_setting_after(&mut conn, |_| ());
    assert_eq!(session, "remote_write");
    conn.batch_execute("RESET synchronous_commit").unwrap();
}

/// A claim lost in a database crash (its commit was not flushed) must not have its fencing
/// token handed out again: the lost claim's relay may still be publishing, and its write-back
/// would then pass the fencing check of the claim that took the token again. Here the loss is
/// a rollback; the same buckets are claimed again, and the lost claim's write-back is refused.
#[cfg(feature = "postgres")]
#[test]
fn a_lost_claims_fencing_token_is_never_handed_out_again() {
    let Some(db) = common::postgres() else { return };
    fill(&db, 3, 2);
    let mut conn = db.conn();
    let lease = Duration::from_secs(30);
    let mut lost = None;
    let _ = conn.transaction::<(), diesel::result::Error, _>(|conn| {
        lost = Some(conn.claim_outbox_messages(10, lease, "lost", 0).unwrap());
        Err(diesel::result::Error::RollbackTransaction)
    });
    let lost = lost.unwrap();
    assert_eq!(lost.messages.len(), 6);
    let again = conn.claim_outbox_messages(10, lease, "again", 0).unwrap();
    assert_eq!(seqs_of(&again), seqs_of(&lost));
    assert_ne!(
        again.token, lost.token,
        "a lost claim's token was handed out again"
    );
    let late = conn
        .complete_outbox_messages(lost.token, &each(&lost, published), Retention::Delete)
        .unwrap();
    assert_eq!((late.applied, late.refused), (0, 6));
    let report = conn
        .complete_outbox_messages(again.token, &each(&again, published), Retention::Delete)
        .unwrap();
    assert_eq!(report.applied, 6);
    assert_eq!(pending_and_parked(&db), (0, 0));
}

/// The write-back does not wait for the disk (a lost write-back only republishes the batch),
/// whether the batch was published whole (one statement) or not (a transaction).
#[cfg(feature = "postgres")]
#[test]
fn the_write_back_does_not_wait_for_the_disk() {
    let Some(db) = common::postgres() else { return };
    fill(&db, 4, 1);
    let mut conn = db.conn();
    let lease = Duration::from_secs(30);
    let claimed = conn
        .claim_outbox_messages(10, lease, "durability", 0)
        .unwrap();
    let seqs: Vec<i64> = claimed.messages.iter().map(|m| m.seq).collect();
    assert_eq!(seqs.len(), 4);
    let in_effect_after = |conn: &mut PgConnection, done: &[Completion]| -> (u64, String) {
        with_commit_setting_after(conn, |conn| {
            conn.complete_outbox_messages(claimed.token, done, Retention::Delete)
                .unwrap()
                .applied
        })
    };
    let whole: Vec<Completion> = seqs
        .iter()
        .map(|&seq| Completion::Published { seq })
        .collect();
    assert_eq!(in_effect_after(&mut conn, &whole), (4, "off".into()));
    let mut mixed = whole.clone();
    mixed[3] = Completion::Release { seq: seqs[3] };
    assert_eq!(in_effect_after(&mut conn, &mixed), (4, "off".into()));
    // Rolled back both times: the batch is still there, and a real write-back takes it.
    let report = conn
        .complete_outbox_messages(claimed.token, &whole, Retention::Delete)
        .unwrap();
    assert_eq!(report.applied, 4);
    assert_eq!(pending_and_parked(&db), (0, 0));
}

/// A claim that read a bucket's messages while the bucket's lease had expired unreleased, and
/// leased it only after its late holder wrote back and released it, reads the bucket again:
/// what it read may have been parked (or published, or put off for a backoff) since. Relay A
/// holds `k`'s first message under a lease that has ended; A's write-back parks it and holds
/// the bucket's lease row, uncommitted, until B's claim waits for that row (after B read its
/// candidates); then A commits. `waits` tells whether the session with the given id waits for
/// A's lease row.
fn a_claim_rereads_a_bucket_a_late_write_back_released<C: Backend + Send>(
    db: TestDb<C>,
    session: impl Fn(&mut C) -> i64,
    waits: impl Fn(&mut C, i64) -> bool,
) {
    let mut a = db.conn();
    a.transaction(|conn| enqueue_all(conn, &[msg("k", 0), msg("k", 1)]))
        .unwrap();
    // Expired at once: stale, not released, when B reads its candidates.
    let held = a.claim_outbox_messages(1, Duration::ZERO, "a", 0).unwrap();
    assert_eq!(seqs_of(&held), vec![("k".to_owned(), 0)]);
    // With A's liveness record gone, B counts itself alone (on PostgreSQL it then reads whole
    // candidate rows and, unless told otherwise, keeps them).
    a.retire_outbox_relay("a").unwrap();
    let mut b = db.conn();
    let b_id = session(&mut b);
    let mut watcher = db.conn();
    let claimer = a
        .transaction::<_, waybill_diesel::Error, _>(|a| {
            let park = [Completion::Park {
                seq: held.messages[0].seq,
                reason: "refused by the broker".into(),
            }];
            let report = a.complete_outbox_messages(held.token, &park, Retention::Delete)?;
            assert_eq!(report.applied, 1);
            let claimer = std::thread::spawn(move || {
                b.claim_outbox_messages(10, Duration::from_secs(60), "b", 0)
                    .unwrap()
            });
            let deadline = Instant::now() + PATIENCE;
            while !waits(&mut watcher, b_id) {
                assert!(
                    Instant::now() < deadline,
                    "B's claim waits for A's lease row"
                );
                std::thread::yield_now();
            }
            Ok(claimer)
        })
        .unwrap();
    let claimed = claimer.join().unwrap();
    assert_eq!(
        seqs_of(&claimed),
        vec![],
        "k's first message is parked, its second waits behind it"
    );
    assert_eq!(pending_and_parked(&db), (1, 1));
}

#[cfg(feature = "postgres")]
#[test]
fn postgres_claim_rereads_a_bucket_a_late_write_back_released() {
    #[derive(QueryableByName)]
    struct Value {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        value: i64,
    }
    let Some(db) = common::postgres() else { return };
    let value = |conn: &mut PgConnection, query: &str, id: i64| {
        diesel::sql_query(query)
            .bind::<diesel::sql_types::BigInt, _>(id)
            .get_result::<Value>(conn)
            .unwrap()
            .value
    };
    a_claim_rereads_a_bucket_a_late_write_back_released(
        db,
        |conn| value(conn, "SELECT pg_backend_pid()::bigint + 0 * $1 AS value", 0),
        |conn, pid| {
            value(
                conn,
                "SELECT cardinality(pg_blocking_pids($1::int))::bigint AS value",
                pid,
            ) > 0
        },
    );
}

/// MySQL reads the chosen messages again after locking their lease rows on every claim, so it
/// has no such window: pinned.
#[cfg(feature = "mysql")]
#[test]
fn mysql_claim_rereads_a_bucket_a_late_write_back_released() {
    #[derive(QueryableByName)]
    struct Value {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        value: i64,
    }
    let Some(db) = common::mysql() else { return };
    let value = |conn: &mut diesel::MysqlConnection, query: &str, id: i64| {
        diesel::sql_query(query)
            .bind::<diesel::sql_types::BigInt, _>(id)
            .get_result::<Value>(conn)
            .unwrap()
            .value
    };
    a_claim_rereads_a_bucket_a_late_write_back_released(
        db,
        |conn| {
            value(
                conn,
                "SELECT CAST(CONNECTION_ID() + 0 * ? AS SIGNED) AS value",
                0,
            )
        },
        // B's statement locking the lease rows: A's write-back holds them until it commits.
        // (MariaDB's INNODB_TRX did not reliably show the lock wait.)
        |conn, id| {
            value(
                conn,
                "SELECT COUNT(*) AS value FROM information_schema.PROCESSLIST \
                 WHERE ID = ? AND INFO LIKE '%FROM `outbox_relay_leases`%FOR UPDATE'",
                id,
            ) > 0
        },
    );
}
