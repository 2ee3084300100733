//! Every operator command of the `waybill` binary on SQLite and PostgreSQL (and MySQL/MariaDB
//! with the `mysql` feature): output, `--json` shape and values, exit codes, and confirmation
//! refused or given on stdin.
#![allow(clippy::expect_used, clippy::unwrap_used)]

#[path = "../../diesel-backend/tests/common/mod.rs"]
mod common;
mod support;

use std::time::Duration;

use common::{Backend, TestDb};
use diesel::r2d2::R2D2Connection;
use support::{Ops, Run};
use waybill_diesel::{DieselStore, Inbox, IncomingMessage, OutboxConnection};
use waybill_outbox_core::{
    InMemoryPublisher, MessageId, NewOutboxMessage, PublishError, Relay, RelayConfig, Retention,
};

/// Exit code of a destructive command that was not confirmed.
const ABORTED: i32 = 3;

struct Seeded {
    /// Parked: its publish failed fatally.
    poison: MessageId,
    /// Pending behind `poison` (same key).
    behind: MessageId,
}

fn waybill<C: R2D2Connection>(db: &TestDb<C>, args: &[&str], stdin: &str) -> Run {
    support::waybill(&db.url, args, stdin)
}

fn message(topic: &str, key: &str, message_type: &str) -> NewOutboxMessage {
    NewOutboxMessage::json(topic, key, message_type, &serde_json::json!({"key": key}))
        .expect("a JSON message")
}

/// orders: 2 published, 1 parked (`poison`), 1 pending behind it; billing: 1 published.
fn seed<C: Backend + Ops>(db: &TestDb<C>) -> Seeded {
    let poison = message("orders", "order:2", "Poison");
    let behind = message("orders", "order:2", "OrderPaid");
    let all = [
        message("orders", "order:1", "OrderPlaced"),
        poison.clone(),
        behind.clone(),
        message("orders", "order:3", "OrderPlaced"),
        message("billing", "invoice:1", "InvoiceSent"),
    ];
    let mut conn = db.conn();
    for m in &all {
        waybill_diesel::enqueue(&mut conn, m).expect("enqueue");
    }
    drain(db);
    Seeded {
        poison: poison.id(),
        behind: behind.id(),
    }
}

/// Runs a relay until nothing is due; `Poison` messages are refused for good.
fn drain<C: Backend + Ops>(db: &TestDb<C>) -> InMemoryPublisher {
    let publisher = InMemoryPublisher::new().with_fault(|m| {
        (m.message_type == "Poison").then(|| PublishError::Fatal("no route to queue".into()))
    });
    let config = RelayConfig::default().retention(Retention::Keep(Duration::from_secs(3600)));
    let mut relay = Relay::new(DieselStore::new(db.pool.clone()), publisher.clone(), config);
    for _ in 0..10 {
        if relay.run_once().expect("a relay round").claimed == 0 {
            return publisher;
        }
    }
    panic!("the relay did not drain the outbox");
}

fn topic<'a>(status: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    status["topics"]
        .as_array()
        .expect("a topics array")
        .iter()
        .find(|t| t["topic"] == name)
        .unwrap_or_else(|| panic!("no topic {name} in {status}"))
}

/// The whitespace-separated cells of the table row starting with `first`.
fn row(stdout: &str, first: &str) -> Vec<String> {
    stdout
        .lines()
        .find(|line| line.split_whitespace().next() == Some(first))
        .unwrap_or_else(|| panic!("no row {first} in\n{stdout}"))
        .split_whitespace()
        .map(str::to_owned)
        .collect()
}

fn status_counts_every_topic_in_a_table_and_as_json<C: Backend + Ops>(db: TestDb<C>) {
    seed(&db);
    // A relay that claimed a message and still holds it.
    waybill_diesel::enqueue(
        &mut db.conn(),
        &message("billing", "invoice:2", "InvoiceSent"),
    )
    .unwrap();
    let claimed = db
        .conn()
        .claim_outbox_messages(10, Duration::from_secs(3600), "relay-test", 0)
        .unwrap();
    assert_eq!(claimed.messages.len(), 1);

    let run = waybill(&db, &["status"], "");
    run.assert_code(0);
    assert_eq!(
        row(&run.stdout, "TOPIC")[..4],
        ["TOPIC", "PENDING", "PARKED", "PUBLISHED"]
    );
    assert_eq!(row(&run.stdout, "orders")[1..4], ["1", "1", "2"]);
    let billing = row(&run.stdout, "billing");
    assert_eq!(billing[1..4], ["1", "0", "1"]);
    assert!(run.stdout.contains("relay-test (1)"), "{}", run.stdout);

    let status = waybill(&db, &["status", "--json"], "")
        .assert_code(0)
        .json();
    let orders = topic(&status, "orders");
    assert_eq!(
        (orders["pending"].as_i64(), orders["parked"].as_i64()),
        (Some(1), Some(1))
    );
    assert_eq!(orders["published"].as_i64(), Some(2));
    let age = orders["oldest_pending_age_s"]
        .as_f64()
        .expect("an age in seconds");
    assert!(age >= 0.0, "{age}");
    if C::NAME == "sqlite" {
        // One writer, one lease: on SQLite a relay's lease covers every key.
        assert_eq!(orders["relays"][0]["owner"], "relay-test");
    } else {
        assert_eq!(orders["relays"], serde_json::json!([]), "another key");
    }
    let billing = topic(&status, "billing");
    assert_eq!(billing["pending"].as_i64(), Some(1));
    assert_eq!(billing["relays"][0]["owner"], "relay-test");
    assert_eq!(billing["relays"][0]["messages"].as_i64(), Some(1));
}

fn status_of_an_empty_outbox_has_no_topics<C: Backend + Ops>(db: TestDb<C>) {
    let run = waybill(&db, &["status"], "");
    run.assert_code(0);
    assert!(run.stdout.contains("the outbox is empty"), "{run:?}");
    let status = waybill(&db, &["--json", "status"], "")
        .assert_code(0)
        .json();
    assert_eq!(status, serde_json::json!({"topics": []}));
}

fn parked_list_and_show_tell_what_failed<C: Backend + Ops>(db: TestDb<C>) {
    let seeded = seed(&db);
    let poison = seeded.poison.to_string();

    let list = waybill(&db, &["parked", "list"], "");
    list.assert_code(0);
    let cells = row(&list.stdout, &poison);
    assert_eq!(cells[1..5], ["orders", "order:2", "Poison", "1"]);
    assert!(list.stdout.contains("no route to queue"), "{list:?}");

    let json = waybill(&db, &["parked", "list", "--json"], "")
        .assert_code(0)
        .json();
    let parked = json["parked"].as_array().expect("a parked array");
    assert_eq!(parked.len(), 1);
    assert_eq!(parked[0]["id"], poison.as_str());
    assert_eq!(parked[0]["attempts"].as_i64(), Some(1));
    assert!(parked[0]["last_error"]
        .as_str()
        .unwrap()
        .contains("no route to queue"));

    let show = waybill(&db, &["parked", "show", &poison], "");
    show.assert_code(0);
    assert!(show.stdout.contains("status:        parked"), "{show:?}");
    assert!(show.stdout.contains("attempts:      1"), "{show:?}");
    assert!(show.stdout.contains(r#"{"key":"order:2"}"#), "{show:?}");
    let json = waybill(&db, &["parked", "show", &poison, "--json"], "")
        .assert_code(0)
        .json();
    assert_eq!(json["status"], "parked");
    assert_eq!(json["payload_preview"], r#"{"key":"order:2"}"#);
    assert_eq!(json["payload_bytes"].as_u64(), Some(17));

    let missing = MessageId::new().to_string();
    let run = waybill(&db, &["parked", "show", &missing], "");
    run.assert_code(1);
    assert!(run.stderr.contains("is not in the outbox"), "{run:?}");
    // `requeue` says it the same way.
    let requeue = waybill(&db, &["requeue", &missing, "--yes"], "");
    requeue.assert_code(1);
    assert_eq!(requeue.stderr, run.stderr);
    waybill(&db, &["parked", "show", "not-an-id"], "").assert_code(1);
}

fn requeue_asks_first_and_puts_parked_messages_back<C: Backend + Ops>(db: TestDb<C>) {
    let seeded = seed(&db);
    let poison = seeded.poison.to_string();

    let refused = waybill(&db, &["requeue", &poison], "n\n");
    refused.assert_code(ABORTED);
    assert!(refused.stderr.contains("[y/N]"), "{refused:?}");
    assert_eq!(
        waybill_diesel::parked_messages(&mut db.conn(), 10)
            .unwrap()
            .len(),
        1
    );
    waybill(&db, &["requeue", &poison], "").assert_code(ABORTED); // no answer at all

    let run = waybill(&db, &["requeue", &poison], "yes\n");
    run.assert_code(0);
    assert_eq!(run.stdout, "requeued 1 message\n");
    assert!(waybill_diesel::parked_messages(&mut db.conn(), 10)
        .unwrap()
        .is_empty());
    // Not parked any more.
    let again = waybill(&db, &["requeue", &poison, "--yes"], "");
    again.assert_code(1);
    assert!(
        again
            .stderr
            .contains("is pending, not parked; nothing was requeued"),
        "{again:?}"
    );

    drain(&db); // parks it again
    waybill(&db, &["requeue", "--key", "order:2", "--yes"], "").assert_code(0);
    drain(&db);
    let run = waybill(&db, &["requeue", "--all-parked"], "y\n");
    run.assert_code(0);
    assert_eq!(run.stdout, "requeued 1 message\n");
    let none = waybill(&db, &["requeue", "--all-parked", "--yes"], "");
    assert_eq!(none.assert_code(0).stdout, "requeued 0 messages\n");
    waybill(&db, &["requeue"], "").assert_code(2);
    waybill(&db, &["requeue", &poison, "--key", "k"], "").assert_code(2);
}

fn skip_moves_a_parked_message_to_the_audit_table_and_unblocks_its_key<C: Backend + Ops>(
    db: TestDb<C>,
) {
    let seeded = seed(&db);
    let poison = seeded.poison.to_string();

    waybill(&db, &["skip", &poison, "--reason", "bad data"], "no\n").assert_code(ABORTED);
    assert!(waybill_diesel::find_message(&mut db.conn(), seeded.poison)
        .unwrap()
        .is_some());
    waybill(&db, &["skip", &poison], "y\n").assert_code(2); // --reason is required

    let run = waybill(
        &db,
        &[
            "skip",
            &poison,
            "--reason",
            "bad data",
            "--by",
            "ops-oncall",
        ],
        "y\n",
    );
    run.assert_code(0);
    assert!(run.stdout.contains(&format!("skipped {poison}")), "{run:?}");
    assert!(waybill_diesel::find_message(&mut db.conn(), seeded.poison)
        .unwrap()
        .is_none());
    assert_eq!(
        C::skipped(&mut db.conn()),
        [("bad data".to_owned(), "ops-oncall".to_owned(), 1)]
    );

    // The message behind it flows now.
    let published = drain(&db);
    assert_eq!(
        published
            .published()
            .iter()
            .map(|m| m.id)
            .collect::<Vec<_>>(),
        [seeded.behind]
    );

    let gone = waybill(&db, &["skip", &poison, "--reason", "x", "--yes"], "");
    gone.assert_code(1);
    assert!(gone.stderr.contains("is not in the outbox"), "{gone:?}");
    let pending = message("orders", "order:9", "OrderPlaced");
    waybill_diesel::enqueue(&mut db.conn(), &pending).unwrap();
    let run = waybill(
        &db,
        &["skip", &pending.id().to_string(), "--reason", "x", "--yes"],
        "",
    );
    run.assert_code(1);
    assert!(run.stderr.contains("not parked"), "{run:?}");
}

fn purge_deletes_old_published_and_skipped_messages_in_batches<C: Backend + Ops>(db: TestDb<C>) {
    let seeded = seed(&db);
    waybill(
        &db,
        &["skip", &seeded.poison.to_string(), "--reason", "x", "--yes"],
        "",
    )
    .assert_code(0);
    drain(&db); // publishes `behind`: 4 published now

    waybill(&db, &["purge", "--older-than", "7d"], "n\n").assert_code(ABORTED);
    let run = waybill(&db, &["purge", "--older-than", "1h", "--yes"], "");
    run.assert_code(0);
    assert!(
        run.stdout.contains("purged 0 published and 0 skipped"),
        "{run:?}"
    );

    let run = waybill(
        &db,
        &["purge", "--older-than", "0s", "--batch-size", "1"],
        "y\n",
    );
    run.assert_code(0);
    assert!(
        run.stdout
            .contains("purged 4 published and 1 skipped messages"),
        "{run:?}"
    );
    let status = waybill(&db, &["status", "--json"], "")
        .assert_code(0)
        .json();
    assert_eq!(status, serde_json::json!({"topics": []}));
    waybill(&db, &["purge", "--older-than", "soon", "--yes"], "").assert_code(2);
}

fn inbox_status_counts_what_a_consumer_processed<C: Backend + Ops>(db: TestDb<C>) {
    let billing = Inbox::new("billing");
    for _ in 0..2 {
        let delivery = IncomingMessage::new(MessageId::new(), "orders", "OrderPlaced", "{}");
        let outcome = billing
            .process_once(&mut db.conn(), &delivery, |_| {
                Ok::<_, waybill_diesel::Error>(())
            })
            .unwrap();
        assert_eq!(outcome, waybill_diesel::Processed::Handled(()));
    }
    let run = waybill(&db, &["inbox", "status", "--consumer", "billing"], "");
    run.assert_code(0);
    assert_eq!(row(&run.stdout, "billing")[1], "2");
    let json = waybill(
        &db,
        &["inbox", "status", "--consumer", "billing", "--json"],
        "",
    )
    .assert_code(0)
    .json();
    assert_eq!(json["processed"].as_i64(), Some(2));
    assert!(json["oldest_processed_at"].is_string(), "{json}");
    waybill(&db, &["inbox", "status"], "").assert_code(2);
}

fn inbox_status_of_an_unknown_consumer_fails_and_lists_the_known_ones<C: Backend + Ops>(
    db: TestDb<C>,
) {
    let run = waybill(&db, &["inbox", "status", "--consumer", "billing"], "");
    run.assert_code(1);
    assert!(
        run.stderr
            .contains("no consumer named \"billing\"; it has no records of any consumer yet"),
        "{run:?}"
    );
    for consumer in ["billing", "shipping"] {
        let delivery = IncomingMessage::new(MessageId::new(), "orders", "OrderPlaced", "{}");
        let _ = Inbox::new(consumer)
            .process_once(&mut db.conn(), &delivery, |_| {
                Ok::<_, waybill_diesel::Error>(())
            })
            .unwrap();
    }
    let typo = waybill(&db, &["inbox", "status", "--consumer", "biling"], "");
    typo.assert_code(1);
    assert_eq!(typo.stdout, "", "{typo:?}");
    assert!(
        typo.stderr.contains(
            "the inbox has no consumer named \"biling\"; consumers with records: billing, shipping"
        ),
        "{typo:?}"
    );
    // A consumer whose records were all purged is still known: 0 processed, exit 0.
    let purged = Inbox::new("shipping")
        .retention(Duration::ZERO)
        .purge_processed(&mut db.conn(), 100)
        .unwrap();
    assert_eq!(purged, 1);
    let purged = waybill(
        &db,
        &["inbox", "status", "--consumer", "shipping", "--json"],
        "",
    )
    .assert_code(0)
    .json();
    assert_eq!(purged["processed"].as_i64(), Some(0));
    assert!(purged["newest_processed_at"].is_null());
}

fn inbox_marks_and_gaps_show_sequenced_consumers<
    C: Backend + Ops + waybill_diesel::InOrderConnection,
>(
    db: TestDb<C>,
) {
    let none = waybill(&db, &["inbox", "gaps"], "");
    none.assert_code(0);
    assert!(none.stdout.contains("no gaps"), "{none:?}");
    let mut conn = db.conn();
    let ids: Vec<MessageId> = (1..=3)
        .map(|i| {
            let msg = message("orders", "order:7", &format!("Step{i}")).sequenced();
            diesel::Connection::transaction(&mut *conn, |conn| waybill_diesel::enqueue(conn, &msg))
                .unwrap()
        })
        .collect();
    let received: Vec<IncomingMessage> = ids
        .iter()
        .map(|id| {
            IncomingMessage::from(
                waybill_diesel::find_message(&mut *conn, *id)
                    .unwrap()
                    .unwrap(),
            )
        })
        .collect();
    let billing = Inbox::new("billing").max_gap_wait(Duration::from_secs(3600));
    let ok = |_: &mut _| Ok::<_, waybill_diesel::Error>(());
    assert!(billing
        .process_in_order(&mut *conn, &received[0], ok)
        .unwrap()
        .is_done());
    let held = billing
        .process_in_order(&mut *conn, &received[2], ok)
        .unwrap();
    assert!(!held.is_done(), "{held:?}");
    drop(conn);

    let marks = waybill(&db, &["inbox", "marks"], "");
    marks.assert_code(0);
    let mark = row(&marks.stdout, "billing");
    assert_eq!(mark[2..5], ["orders", "order:7", "1"], "{marks:?}");
    let json = waybill(
        &db,
        &["inbox", "marks", "--consumer", "billing", "--json"],
        "",
    )
    .assert_code(0)
    .json();
    assert_eq!(json["marks"][0]["last_sequence"].as_u64(), Some(1));
    assert_eq!(json["marks"][0]["source"], "urn:waybill:orders");

    let gaps = waybill(&db, &["inbox", "gaps"], "");
    gaps.assert_code(0);
    let gap = row(&gaps.stdout, "billing");
    assert_eq!(
        gap[1..6],
        ["orders", "order:7", "2", "3", "held"],
        "{gaps:?}"
    );
    let json = waybill(&db, &["inbox", "gaps", "--json"], "")
        .assert_code(0)
        .json();
    assert_eq!(json["gaps"][0]["message_id"], ids[2].to_string());
    assert_eq!(json["gaps"][0]["state"], "held");
    let other = waybill(
        &db,
        &["inbox", "gaps", "--consumer", "shipping", "--json"],
        "",
    )
    .assert_code(0)
    .json();
    assert_eq!(other, serde_json::json!({"gaps": []}));

    let rotated = waybill(&db, &["rotate-epoch", "--yes"], "");
    rotated.assert_code(0);
    assert!(
        rotated.stdout.starts_with("new producer epoch "),
        "{rotated:?}"
    );
}

backend_tests!(
    inbox_marks_and_gaps_show_sequenced_consumers,
    status_counts_every_topic_in_a_table_and_as_json,
    status_of_an_empty_outbox_has_no_topics,
    parked_list_and_show_tell_what_failed,
    requeue_asks_first_and_puts_parked_messages_back,
    skip_moves_a_parked_message_to_the_audit_table_and_unblocks_its_key,
    purge_deletes_old_published_and_skipped_messages_in_batches,
    inbox_status_counts_what_a_consumer_processed,
    inbox_status_of_an_unknown_consumer_fails_and_lists_the_known_ones,
    migrate_creates_the_schema,
    relay_on_an_unmigrated_database_fails_at_once_saying_to_migrate,
);

#[test]
fn migrate_creates_the_schema_on_a_new_sqlite_file_given_as_a_path_or_url() {
    let path = std::env::temp_dir().join(format!("waybill-migrate-{}.db", uuid::Uuid::new_v4()));
    let path = path.to_string_lossy().into_owned();
    let run = support::waybill(&path, &["migrate"], "");
    run.assert_code(0);
    assert!(run.stdout.starts_with("applied "), "{run:?}");
    assert!(run.stdout.contains("_create_outbox\n"), "{run:?}");
    let url = format!("sqlite://{path}");
    support::waybill(&url, &["status"], "").assert_code(0);
    let again = support::waybill(&url, &["migrate"], "");
    assert_eq!(
        again.assert_code(0).stdout,
        "migrations are up to date: nothing to apply\n"
    );
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{path}{suffix}"));
    }
}

fn migrate_creates_the_schema<C: Backend + Ops>(db: TestDb<C>) {
    waybill_diesel::revert_migrations(&mut db.conn()).unwrap();
    let run = waybill(&db, &["status"], "");
    run.assert_code(1); // no tables
    assert!(run.stderr.contains("error: database error: "), "{run:?}");
    assert!(
        run.stderr.contains("waybill migrate"),
        "says what to do: {run:?}"
    );
    let cause = run
        .stderr
        .rsplit("database error: ")
        .next()
        .unwrap_or_default();
    let cause = cause.split(" (run").next().unwrap_or_default();
    assert_eq!(
        run.stderr.matches(cause).count(),
        1,
        "the cause is named once: {run:?}"
    );
    let run = waybill(&db, &["migrate"], "");
    run.assert_code(0);
    let applied: Vec<&str> = run.stdout.lines().skip(1).map(str::trim).collect();
    assert_eq!(
        run.stdout.lines().next(),
        Some(format!("applied {} migrations:", applied.len()).as_str()),
        "{run:?}"
    );
    assert!(applied[0].ends_with("_create_outbox"), "{run:?}");
    let again = waybill(&db, &["migrate"], "");
    assert_eq!(
        again.assert_code(0).stdout,
        "migrations are up to date: nothing to apply\n"
    );
    waybill(&db, &["status", "--json"], "").assert_code(0);
}

fn relay_on_an_unmigrated_database_fails_at_once_saying_to_migrate<C: Backend + Ops>(
    db: TestDb<C>,
) {
    waybill_diesel::revert_migrations(&mut db.conn()).unwrap();
    let started = std::time::Instant::now();
    let run = waybill(&db, &["relay", "--broker-url", "nats://127.0.0.1:1"], "");
    run.assert_code(1);
    assert!(started.elapsed() < Duration::from_secs(10), "{run:?}");
    assert_eq!(run.stderr.lines().count(), 1, "one line: {run:?}");
    assert!(run.stderr.contains("run `waybill migrate`"), "{run:?}");
}

#[test]
fn read_only_commands_never_create_a_sqlite_file() {
    let dir = std::env::temp_dir().join(format!("waybill-ro-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir(&dir).unwrap();
    let path = dir.join("typo.db").to_string_lossy().into_owned();
    let id = MessageId::new().to_string();
    let commands: [&[&str]; 7] = [
        &["status"],
        &["parked", "list"],
        &["parked", "show", &id],
        &["inbox", "status", "--consumer", "billing"],
        &["requeue", "--all-parked", "--yes"],
        &["purge", "--older-than", "1d", "--yes"],
        &["relay", "--broker-url", "nats://127.0.0.1:1"],
    ];
    for args in commands {
        for url in [path.clone(), format!("sqlite://{path}")] {
            let run = support::waybill(&url, args, "");
            run.assert_code(1);
            assert!(
                run.stderr
                    .contains(&format!("no SQLite database at {path}: check the path")),
                "{args:?}: {run:?}"
            );
            assert!(
                std::fs::read_dir(&dir).unwrap().next().is_none(),
                "{args:?} created a file"
            );
        }
    }
    std::fs::remove_dir(&dir).unwrap();
}

#[test]
fn unknown_url_schemes_and_empty_urls_are_refused_with_the_accepted_ones() {
    for (url, says) in [
        (
            "redis://app:s3cret@127.0.0.1:6379",
            "redis://app:***@127.0.0.1:6379: unknown database URL scheme \"redis\"",
        ),
        (
            "http://127.0.0.1/db",
            "unknown database URL scheme \"http\"",
        ),
        ("", "the database URL is empty"),
    ] {
        let run = support::waybill(url, &["status"], "");
        run.assert_code(1);
        assert!(run.stderr.contains(says), "{url:?}: {run:?}");
        assert!(
            run.stderr
                .contains("postgres://..., postgresql://..., mysql://..., mariadb://..., sqlite://PATH or a SQLite file path"),
            "lists what is accepted: {run:?}"
        );
        assert!(!run.stderr.contains("s3cret"), "{run:?}");
        assert!(!std::path::Path::new(url).exists() || url.is_empty());
    }
}

#[test]
fn relay_on_a_database_that_does_not_exist_fails_at_once_in_one_line() {
    let base = common::pg_url();
    let base = base
        .rsplit_once('/')
        .map_or(base.as_str(), |(base, _)| base);
    for url in [
        format!("{base}/waybill_no_such_database"),
        "postgres://app:s3cret@127.0.0.1:1/none".to_owned(),
    ] {
        let started = std::time::Instant::now();
        let run = support::waybill(&url, &["relay", "--broker-url", "nats://127.0.0.1:1"], "");
        run.assert_code(1);
        assert!(started.elapsed() < Duration::from_secs(10), "{run:?}");
        assert_eq!(run.stderr.lines().count(), 1, "one line: {run:?}");
        assert!(run.stderr.starts_with("error: connecting to "), "{run:?}");
        assert!(!run.stderr.contains("s3cret"), "{run:?}");
    }
}

#[test]
fn error_chains_name_each_cause_once() {
    let run = support::waybill("postgres://app:s3cret@127.0.0.1:1/none", &["status"], "");
    run.assert_code(1);
    assert_eq!(run.stderr.lines().count(), 1, "{run:?}");
    let parts: Vec<&str> = run.stderr.trim_end().split(": ").collect();
    for part in &parts {
        assert_eq!(
            parts.iter().filter(|p| p == &part).count(),
            1,
            "{part:?} repeated: {run:?}"
        );
    }
}

#[test]
fn errors_name_the_database_without_its_password() {
    let run = support::waybill("postgres://app:s3cret@127.0.0.1:1/none", &["status"], "");
    run.assert_code(1);
    assert!(
        run.stderr.contains("postgres://app:***@127.0.0.1:1/none"),
        "{run:?}"
    );
    assert!(!run.stderr.contains("s3cret"), "{run:?}");
}

#[cfg(not(feature = "mysql"))]
#[test]
fn a_mysql_url_without_the_mysql_feature_is_a_clear_error() {
    let run = support::waybill("mysql://root:pw@127.0.0.1/test", &["status"], "");
    run.assert_code(1);
    assert!(
        run.stderr.contains("without the `mysql` feature"),
        "{run:?}"
    );
}

#[test]
fn relay_leases_and_batch_sizes_out_of_bounds_are_usage_errors() {
    let db = "/nonexistent/waybill.db";
    for (flag, value) in [
        ("--lease", "2days"),
        ("--lease", "0s"),
        ("--batch-size", "0"),
        ("--batch-size", "50001"),
    ] {
        let run = support::waybill(
            db,
            &["relay", "--broker-url", "nats://127.0.0.1:1", flag, value],
            "",
        );
        run.assert_code(2);
        assert!(run.stderr.contains(flag), "{run:?}");
    }
}
