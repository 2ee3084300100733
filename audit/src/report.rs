//! The audit's result: a table for people, and the same as one JSON line for machines.

use std::collections::HashMap;
use std::time::Duration;

use serde::Serialize;

use crate::counter::Event;
use crate::db::Outcome;
use crate::operator::Operator;

/// Faults the run injected.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub(crate) struct Faults {
    /// Relay processes SIGKILLed by the schedule.
    pub(crate) relay_kills: u64,
    /// Consumer processes SIGKILLed by the schedule.
    pub(crate) consumer_kills: u64,
    /// Workers that crashed at an injected crash point (after-claim, after-confirm,
    /// after-handler-commit), or relay threads that did so in-process.
    pub(crate) worker_crashes: u64,
    /// Workers that exited on an error, e.g. a broker unreachable at start.
    pub(crate) worker_errors: u64,
    /// Relays paused past their lease (SIGSTOP, then SIGCONT), or stalled in-process.
    pub(crate) relay_pauses: u64,
    /// Every broker connection cut at once.
    pub(crate) broker_cuts: u64,
    /// Stretches with the broker unreachable.
    pub(crate) broker_outages: u64,
    /// `pg_terminate_backend` rounds on the workers' backends.
    pub(crate) backend_terminations: u64,
    /// Stretches with the broker unreachable for longer than the relays' whole retry budget
    /// (every attempt and every backoff between them).
    pub(crate) outages_beyond_budget: u64,
    /// Messages the writer made unreadable: headers overwritten by raw SQL with JSON that is
    /// not a string map.
    pub(crate) unreadable_rows: u64,
    /// Injected handler panics, caught on the consumer side, which kept its connection.
    pub(crate) handler_panics: u64,
    /// Injected transient handler failures, answered with a retry.
    pub(crate) handler_retries: u64,
    /// Injected failed statements the handler ignored before returning success (on
    /// PostgreSQL the transaction is then aborted and COMMIT rolls back).
    pub(crate) handler_ignored_errors: u64,
}

/// Everything the run measured.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct Report {
    /// The database and broker, e.g. `postgres + amqp`.
    pub(crate) setup: String,
    /// Messages the writer committed.
    pub(crate) messages: u64,
    /// Publishes the broker confirmed, duplicates included.
    pub(crate) published: u64,
    /// Handler invocations, duplicates included.
    pub(crate) deliveries: u64,
    /// Deliveries the inbox dropped as duplicates.
    pub(crate) duplicates_dropped: u64,
    /// Effect rows.
    pub(crate) effects: u64,
    /// Committed messages without an effect.
    pub(crate) lost: u64,
    /// Messages with more than one effect.
    pub(crate) double_effects: u64,
    /// Effects applied after an effect of a later message of the same key.
    pub(crate) order_violations: u64,
    /// Sequenced mode only (else `None`): effects that are not their key's next number (gaps,
    /// duplicates, reorderings), see `db::sequence_violations`.
    pub(crate) sequence_violations: Option<u64>,
    /// Effects of messages never committed.
    pub(crate) phantom_effects: u64,
    /// Messages parked by a broker outage (found parked, not unreadable); the operator
    /// requeued them so the run could drain.
    pub(crate) parked_by_outage: u64,
    /// Deliveries reported handled on a connection still inside a transaction: they never
    /// committed.
    pub(crate) handled_uncommitted: u64,
    /// Unreadable rows the operator repaired and requeued.
    pub(crate) unreadable_requeued: u64,
    /// The fault schedule's seed.
    pub(crate) seed: u64,
    /// The faults injected.
    pub(crate) faults: Faults,
    /// Wall time of the whole run.
    pub(crate) elapsed_secs: f64,
}

impl Report {
    /// Puts the database's outcome and the workers' counts together.
    pub(crate) fn new(
        setup: String,
        outcome: Outcome,
        counts: &HashMap<Event, u64>,
        seed: u64,
        mut faults: Faults,
        operator: &Operator,
        elapsed: Duration,
    ) -> Self {
        let count = |event| counts.get(&event).copied().unwrap_or(0);
        faults.handler_panics = count(Event::HandlerPanic);
        faults.handler_retries = count(Event::HandlerRetry);
        faults.handler_ignored_errors = count(Event::HandlerIgnoredError);
        faults.unreadable_rows = outcome.unreadable;
        Self {
            setup,
            messages: outcome.messages,
            published: count(Event::Published),
            deliveries: count(Event::Delivery),
            duplicates_dropped: count(Event::DuplicateDropped),
            effects: outcome.effects,
            lost: outcome.lost,
            double_effects: outcome.double_effects,
            order_violations: outcome.order_violations,
            sequence_violations: Some(outcome.sequence_violations),
            phantom_effects: outcome.phantom,
            parked_by_outage: operator.parked_by_outage,
            handled_uncommitted: count(Event::HandledUncommitted),
            unreadable_requeued: operator.unreadable_requeued,
            seed,
            faults,
            elapsed_secs: (elapsed.as_secs_f64() * 10.0).round() / 10.0,
        }
    }

    /// Keeps the sequence check only for a sequenced run: in the other runs an effect carries
    /// the writer's index within its key (from 0), not a number the producer assigned.
    pub(crate) fn sequenced(mut self, sequenced: bool) -> Self {
        if !sequenced {
            self.sequence_violations = None;
        }
        self
    }

    /// Nothing lost, doubled, reordered or invented; nothing parked by an outage, nothing
    /// reported handled that never committed.
    pub(crate) fn passed(&self) -> bool {
        self.lost == 0
            && self.double_effects == 0
            && self.order_violations == 0
            && self.sequence_violations.unwrap_or(0) == 0
            && self.phantom_effects == 0
            && self.parked_by_outage == 0
            && self.handled_uncommitted == 0
    }

    /// Prints the table, then the JSON line last.
    pub(crate) fn print(&self) {
        let f = &self.faults;
        let rows = [
            ("setup", self.setup.clone()),
            ("messages committed", self.messages.to_string()),
            (
                "messages published (with duplicates)",
                self.published.to_string(),
            ),
            ("deliveries", self.deliveries.to_string()),
            (
                "duplicates dropped by the inbox",
                self.duplicates_dropped.to_string(),
            ),
            ("effects applied", self.effects.to_string()),
            ("**lost**", self.lost.to_string()),
            ("**double effects**", self.double_effects.to_string()),
            ("**per-key order violations**", self.order_violations.to_string()),
            (
                "**sequence gaps, duplicates or reorderings** (sequenced mode)",
                self.sequence_violations
                    .map_or_else(|| "not checked".to_owned(), |n| n.to_string()),
            ),
            ("effects of uncommitted messages", self.phantom_effects.to_string()),
            ("**messages parked by an outage**", self.parked_by_outage.to_string()),
            (
                "**deliveries handled but never committed**",
                self.handled_uncommitted.to_string(),
            ),
            (
                "unreadable rows repaired and requeued",
                format!("{} of {}", self.unreadable_requeued, f.unreadable_rows),
            ),
            (
                "faults",
                format!(
                    "{} relay kills, {} consumer kills, {} crash points hit, {} relay pauses past the lease, \
                     {} broker cuts, {} broker outages ({} beyond the relays' retry budget), \
                     {} pg_terminate_backend rounds, {} handler panics, {} handler retries, \
                     {} ignored failed statements \
                     ({} worker exits on errors)",
                    f.relay_kills,
                    f.consumer_kills,
                    f.worker_crashes,
                    f.relay_pauses,
                    f.broker_cuts,
                    f.broker_outages,
                    f.outages_beyond_budget,
                    f.backend_terminations,
                    f.handler_panics,
                    f.handler_retries,
                    f.handler_ignored_errors,
                    f.worker_errors
                ),
            ),
            ("seed", self.seed.to_string()),
            ("elapsed", format!("{:.1} s", self.elapsed_secs)),
        ];
        println!("| | |");
        println!("|---|---|");
        for (name, value) in rows {
            println!("| {name} | {value} |");
        }
        println!(
            "{}",
            serde_json::to_string(self)
                .unwrap_or_else(|error| format!("{{\"error\":\"{error}\"}}"))
        );
    }
}
