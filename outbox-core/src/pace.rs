//! When the pipelined relay claims its next batch: while it publishes the current one, or after.

use std::time::Duration;

/// Decides, batch by batch, whether [`Relay::run_pipelined`](crate::Relay::run_pipelined)
/// claims ahead. A claim made while a batch is in flight must leave that batch's key buckets
/// alone and share the rest, so it costs the database more per message than a claim made with
/// nothing in flight. Claiming ahead, a message takes about as long as the longer of
/// publishing it and its share of the database round (write-back and claim) beside it;
/// claiming in turn, both one after the other. The pace estimates both per message from the
/// medians of recent measurements: it claims in turn once that looks 5% faster, and ahead
/// again only once that looks 10% faster, as claiming ahead costs the database more for the
/// same work. Either switch needs three rounds in a row that call for it, so that noise does
/// not make it flap. A round in turn not yet measured counts as half a round ahead, and the
/// other way round; a round ahead never counts as cheaper than one in turn, so with a fast
/// publisher (whose time bounds what overlapping can save) the relay stays in turn. The mode
/// not in use is never measured, so after `STALE_AFTER` rounds in one mode its old
/// measurements are forgotten, as at the start: one taken under a load that has since passed
/// must not keep the relay in the other mode for good.
#[derive(Debug, Clone)]
pub(crate) struct Pace {
    ahead: bool,
    /// Time to publish a batch, per message.
    publish: Recent,
    /// Database time of a round that claimed ahead while a batch was in flight, per message
    /// claimed.
    round_ahead: Recent,
    /// Database time of a round that wrote back and then claimed, nothing in flight, per
    /// message claimed.
    round_in_turn: Recent,
    /// Rounds in a row that called for switching modes.
    calls_to_switch: u8,
    /// Rounds measured since the last switch, or since the other mode's rounds were forgotten.
    rounds_in_mode: usize,
}

impl Default for Pace {
    /// Claims ahead until measurements say otherwise.
    fn default() -> Self {
        Self {
            ahead: true,
            publish: Recent::default(),
            round_ahead: Recent::default(),
            round_in_turn: Recent::default(),
            calls_to_switch: 0,
            rounds_in_mode: 0,
        }
    }
}

impl Pace {
    /// Rounds in one mode after which the other mode's measurements count as stale.
    const STALE_AFTER: usize = 100;

    /// Whether to claim the next batch while publishing the current one.
    pub(crate) fn ahead(&self) -> bool {
        self.ahead
    }

    /// A batch of `messages` took `took` to publish.
    pub(crate) fn published(&mut self, took: Duration, messages: usize) {
        self.publish.add(per_message(took, messages));
    }

    /// A round claiming ahead, made while a batch was in flight, took `took` and found `found`
    /// messages. One that found none overlapped nothing (every bucket with work was in flight,
    /// as always on a one-bucket backend): the relay claims in turn.
    pub(crate) fn claimed_ahead(&mut self, took: Duration, found: usize) {
        if !self.ahead {
            return;
        }
        if found == 0 {
            self.switch(false, "a claim ahead found nothing");
            return;
        }
        self.round_ahead.add(per_message(took, found));
        self.decide();
    }

    /// A round claiming in turn (write-back, then a claim that found `found` messages of the
    /// `limit` it asked for) took `took`. Only full batches count: a partial one means the
    /// relay keeps up, and its round's fixed costs would weigh on few messages.
    pub(crate) fn claimed_in_turn(&mut self, took: Duration, found: usize, limit: usize) {
        if self.ahead || found == 0 || found < limit {
            return;
        }
        self.round_in_turn.add(per_message(took, found));
        self.decide();
    }

    fn decide(&mut self) {
        self.rounds_in_mode += 1;
        if self.rounds_in_mode >= Self::STALE_AFTER {
            self.rounds_in_mode = 0;
            let other = if self.ahead {
                &mut self.round_in_turn
            } else {
                &mut self.round_ahead
            };
            if !other.samples.is_empty() {
                log::debug!(
                    "pipelined relay forgets its rounds {}: {} rounds in the other mode made them stale",
                    if self.ahead { "in turn" } else { "ahead" },
                    Self::STALE_AFTER
                );
                other.samples.clear();
            }
        }
        let Some(publish) = self.publish.median() else {
            return;
        };
        let (ahead, in_turn) = match (self.round_ahead.median(), self.round_in_turn.median()) {
            (Some(ahead), Some(in_turn)) => (ahead, in_turn),
            (Some(ahead), None) => (ahead, ahead / 2),
            (None, Some(in_turn)) => (in_turn * 2, in_turn),
            (None, None) => return,
        };
        // A claim ahead does what a claim in turn does and more: measured below it, the
        // estimate is stale (the other mode's rounds ran under another load), not a saving.
        let ahead = ahead.max(in_turn);
        // Per message: overlapped, or one after the other.
        let (cost_ahead, cost_in_turn) = (publish.max(ahead), publish + in_turn);
        let call = if self.ahead {
            cost_in_turn * 20 < cost_ahead * 19
        } else {
            cost_ahead * 10 < cost_in_turn * 9
        };
        self.calls_to_switch = if call { self.calls_to_switch + 1 } else { 0 };
        if self.calls_to_switch >= 3 {
            let why = if self.ahead {
                "publishing hides too little of the database work"
            } else {
                "publishing hides enough of the database work"
            };
            self.switch(!self.ahead, why);
        }
    }

    fn switch(&mut self, ahead: bool, why: &str) {
        log::debug!(
            "pipelined relay now claims {}: {why} (per message: publishing {:?}, database \
             rounds {:?} ahead, {:?} in turn)",
            if ahead { "ahead" } else { "in turn" },
            self.publish.median(),
            self.round_ahead.median(),
            self.round_in_turn.median(),
        );
        self.ahead = ahead;
        self.calls_to_switch = 0;
        self.rounds_in_mode = 0;
    }
}

/// The time per message: batches claimed ahead and in turn differ in size.
fn per_message(took: Duration, messages: usize) -> Duration {
    took / u32::try_from(messages.max(1)).unwrap_or(u32::MAX)
}

/// The median of the last few samples: one slow round (a checkpoint, a scheduler hiccup)
/// does not move it.
#[derive(Debug, Clone, Default)]
struct Recent {
    samples: std::collections::VecDeque<Duration>,
}

impl Recent {
    const KEPT: usize = 5;

    fn add(&mut self, sample: Duration) {
        if self.samples.len() == Self::KEPT {
            self.samples.pop_front();
        }
        self.samples.push_back(sample);
    }

    fn median(&self) -> Option<Duration> {
        let mut sorted: Vec<Duration> = self.samples.iter().copied().collect();
        sorted.sort_unstable();
        sorted.get(sorted.len() / 2).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    /// `rounds` batches, each publishing in `publish`, with database rounds of `ahead` when
    /// claiming ahead and `in_turn` when claiming in turn.
    fn after(rounds: usize, publish: Duration, (ahead, in_turn): (Duration, Duration)) -> Pace {
        let mut pace = Pace::default();
        run(&mut pace, rounds, publish, (ahead, in_turn));
        pace
    }

    fn run(
        pace: &mut Pace,
        rounds: usize,
        publish: Duration,
        (ahead, in_turn): (Duration, Duration),
    ) {
        for _ in 0..rounds {
            pace.published(publish, 1);
            if pace.ahead() {
                pace.claimed_ahead(ahead, 1);
            } else {
                pace.claimed_in_turn(in_turn, 1, 1);
            }
        }
    }

    #[test]
    fn a_slow_broker_keeps_the_relay_claiming_ahead() {
        assert!(after(20, 20 * MS, (8 * MS, 5 * MS)).ahead());
    }

    #[test]
    fn an_instant_publisher_makes_the_relay_claim_in_turn_and_stay_so() {
        let pace = after(3, Duration::from_micros(5), (8 * MS, 5 * MS));
        assert!(!pace.ahead());
        assert!(!after(50, Duration::from_micros(5), (8 * MS, 5 * MS)).ahead());
    }

    #[test]
    fn overlap_that_saves_time_is_kept_even_when_publishing_is_the_shorter_part() {
        // Ahead: max(8, 16) = 16 ms a batch; in turn: 8 + 10 = 18 ms.
        assert!(after(30, 8 * MS, (16 * MS, 10 * MS)).ahead());
    }

    #[test]
    fn a_broker_slowing_down_brings_claims_ahead_back() {
        let mut pace = after(5, MS, (8 * MS, 5 * MS));
        assert!(!pace.ahead());
        run(&mut pace, 10, 30 * MS, (8 * MS, 5 * MS));
        assert!(pace.ahead());
    }

    #[test]
    fn a_claim_ahead_that_finds_nothing_switches_to_claiming_in_turn() {
        let mut pace = Pace::default();
        pace.published(50 * MS, 1);
        pace.claimed_ahead(2 * MS, 0);
        assert!(!pace.ahead());
        // A slow broker alone does not bring it back: with a claim ahead assumed to cost twice
        // one in turn, a batch would take max(100, 6) ms instead of 100 + 3, under the margin.
        run(&mut pace, 20, 100 * MS, (MS, 3 * MS));
        assert!(!pace.ahead());
    }

    #[test]
    fn rounds_of_the_other_mode_are_ignored() {
        let mut pace = Pace::default();
        pace.published(MS, 1);
        pace.claimed_in_turn(100 * MS, 1, 1);
        assert!(pace.ahead());
        for _ in 0..3 {
            pace.claimed_ahead(8 * MS, 1);
        }
        assert!(!pace.ahead());
        pace.claimed_ahead(100 * MS, 1);
        assert_eq!(pace.round_ahead.median(), Some(8 * MS));
    }

    #[test]
    fn one_noisy_round_does_not_switch() {
        let mut pace = after(10, Duration::from_micros(5), (8 * MS, 5 * MS));
        assert!(!pace.ahead());
        // A round in turn 20 times slower than usual, then usual ones again.
        pace.claimed_in_turn(100 * MS, 1, 1);
        run(&mut pace, 10, Duration::from_micros(5), (8 * MS, 5 * MS));
        assert!(!pace.ahead());
    }

    #[test]
    fn a_stale_cheap_round_ahead_does_not_lure_a_fast_publisher_back() {
        let mut pace = after(5, Duration::from_micros(5), (8 * MS, 5 * MS));
        assert!(!pace.ahead());
        // Rounds in turn slow down under load; the rounds ahead were measured before it.
        run(&mut pace, 20, Duration::from_micros(5), (8 * MS, 20 * MS));
        assert!(!pace.ahead());
    }

    #[test]
    fn a_stale_costly_round_ahead_is_forgotten_and_claims_ahead_come_back() {
        // Under load, claiming ahead costs 20 ms a batch against 5 + 2 in turn.
        let mut pace = after(10, 5 * MS, (20 * MS, 2 * MS));
        assert!(!pace.ahead());
        // The load passes: a claim ahead would now take 4 ms, but none is made to show it.
        run(&mut pace, 50, 5 * MS, (4 * MS, 2 * MS));
        assert!(!pace.ahead());
        // Forgotten, the round ahead counts as twice one in turn, 4 ms: max(5, 4) < 5 + 2.
        run(&mut pace, Pace::STALE_AFTER, 5 * MS, (4 * MS, 2 * MS));
        assert!(pace.ahead());
        // Measured again, it holds.
        run(&mut pace, 300, 5 * MS, (4 * MS, 2 * MS));
        assert!(pace.ahead());
    }

    #[test]
    fn forgetting_the_other_mode_does_not_make_a_steady_relay_flap() {
        for (publish, rounds, ahead) in [
            (Duration::from_micros(5), (8 * MS, 5 * MS), false),
            (20 * MS, (8 * MS, 5 * MS), true),
            (8 * MS, (16 * MS, 10 * MS), true),
        ] {
            let mut pace = after(5, publish, rounds);
            for _ in 0..1000 {
                run(&mut pace, 1, publish, rounds);
                assert_eq!(pace.ahead(), ahead);
            }
        }
    }

    #[test]
    fn partial_batches_in_turn_are_not_measured() {
        let mut pace = after(5, Duration::from_micros(5), (8 * MS, 5 * MS));
        let measured = pace.round_in_turn.samples.clone();
        pace.claimed_in_turn(MS, 10, 1000);
        assert_eq!(pace.round_in_turn.samples, measured);
    }
}
