//! When the pipelined relay claims its next batch: while it publishes the current one, or after.

use std::time::Instant;

/// Decides whether [`Relay::run_pipelined`](crate::Relay::run_pipelined) claims ahead, by
/// measuring both modes as it runs and keeping the faster.
///
/// Which mode is faster cannot be told from the parts: claiming ahead overlaps publishing with
/// the database round, but a claim made while a batch is in flight costs the database more,
/// and where the database, the broker and the relay share a few cores the overlap only moves
/// work between them (on 2 cores, the relay to Kafka ran 15% slower claiming ahead, to
/// RabbitMQ faster). So the pace measures what matters, messages published per second, over
/// windows of [`WINDOW`](Pace::WINDOW) batches in a row, counting only windows in which the
/// relay was never idle (then the rate is the relay's, not the rate messages arrive at).
///
/// It starts claiming ahead; after [`TRIAL`](Pace::TRIAL) windows it tries the other mode for
/// as many (the first window after a switch warms up and is not counted), then keeps the mode
/// whose median rate was higher. Conditions change (another relay starts, the broker slows
/// down), so after [`STALE_AFTER`](Pace::STALE_AFTER) windows in one mode the other's rates
/// are forgotten and it is tried again: when it is slower, the trials cost about
/// `(TRIAL + 1) / STALE_AFTER` of that difference. A claim ahead that finds nothing while a
/// batch is in flight (every bucket with work is in flight, as always on SQLite's one bucket)
/// switches to claiming in turn at once, and counts as the slower mode until the next trial.
#[derive(Debug, Clone)]
pub(crate) struct Pace {
    ahead: bool,
    /// Recent window rates (messages per second) claiming ahead.
    rates_ahead: Recent,
    /// Recent window rates (messages per second) claiming in turn.
    rates_in_turn: Recent,
    window: Window,
    /// Counted windows since the last switch.
    windows_in_mode: usize,
    /// Trying the other mode: its rates decide once there are `TRIAL` of them.
    trying: bool,
}

/// Batches published in a row with no idle round between them.
#[derive(Debug, Clone, Default)]
struct Window {
    started: Option<Instant>,
    messages: usize,
    batches: usize,
    /// The first window after a switch carries the other mode's last round: not counted.
    warming_up: bool,
}

impl Default for Pace {
    /// Claims ahead until measurements say otherwise.
    fn default() -> Self {
        Self {
            ahead: true,
            rates_ahead: Recent::default(),
            rates_in_turn: Recent::default(),
            window: Window::default(),
            windows_in_mode: 0,
            trying: false,
        }
    }
}

impl Pace {
    /// Batches per measured window.
    const WINDOW: usize = 8;
    /// Windows measured in a mode before comparing it with the other.
    const TRIAL: usize = 3;
    /// Windows in one mode after which the other mode's rates count as stale.
    const STALE_AFTER: usize = 60;

    /// Whether to claim the next batch while publishing the current one.
    pub(crate) fn ahead(&self) -> bool {
        self.ahead
    }

    /// A batch of `messages` finished publishing at `now`.
    pub(crate) fn published(&mut self, messages: usize, now: Instant) {
        let window = &mut self.window;
        let Some(started) = window.started else {
            // The first batch of a window only marks its start: the time before it was not
            // spent on the window's batches.
            window.started = Some(now);
            return;
        };
        window.messages += messages;
        window.batches += 1;
        if window.batches < Self::WINDOW {
            return;
        }
        let elapsed = now.saturating_duration_since(started).as_secs_f64();
        let (messages, warming_up) = (window.messages, window.warming_up);
        *window = Window {
            started: Some(now),
            ..Window::default()
        };
        if warming_up || elapsed <= 0.0 {
            return;
        }
        self.rates_mut(self.ahead).add(messages as f64 / elapsed);
        self.decide();
    }

    /// The relay found no work, or paused: the window in progress does not measure it.
    pub(crate) fn interrupted(&mut self) {
        self.window = Window {
            warming_up: self.window.warming_up,
            ..Window::default()
        };
    }

    /// A claim ahead, made while a batch was in flight, found nothing although the relay
    /// looked for work: every bucket with work was in flight (on SQLite's one bucket, always).
    /// Claiming in turn, the next claim waits for that batch's write-back and finds the work.
    pub(crate) fn found_nothing_ahead(&mut self) {
        if self.ahead {
            // Slower than any measured rate, until the next trial.
            self.rates_ahead = Recent::default();
            self.rates_ahead.add(0.0);
            self.switch(false, "a claim ahead found nothing".into());
        }
    }

    fn rates(&self, ahead: bool) -> &Recent {
        if ahead {
            &self.rates_ahead
        } else {
            &self.rates_in_turn
        }
    }

    fn rates_mut(&mut self, ahead: bool) -> &mut Recent {
        if ahead {
            &mut self.rates_ahead
        } else {
            &mut self.rates_in_turn
        }
    }

    fn decide(&mut self) {
        self.windows_in_mode += 1;
        if self.windows_in_mode < Self::TRIAL {
            return;
        }
        let (here, there) = (
            self.rates(self.ahead).median(),
            self.rates(!self.ahead).median(),
        );
        let (Some(here), Some(there)) = (here, there) else {
            // The other mode is not measured yet, or no more: try it.
            self.trying = true;
            let why = format!("trying it ({here:.0?} msg/s in the other mode)");
            self.switch(!self.ahead, why);
            return;
        };
        if self.trying {
            self.trying = false;
            if there > here {
                let why = format!("{there:.0} msg/s against {here:.0} msg/s trying the other mode");
                self.switch(!self.ahead, why);
                return;
            }
            log::debug!(
                "pipelined relay keeps claiming {}: {here:.0} msg/s against {there:.0} msg/s",
                mode(self.ahead)
            );
        }
        if self.windows_in_mode >= Self::STALE_AFTER {
            // Measured under conditions that may have passed: tried again next window.
            *self.rates_mut(!self.ahead) = Recent::default();
        }
    }

    fn switch(&mut self, ahead: bool, why: String) {
        log::debug!("pipelined relay now claims {}: {why}", mode(ahead));
        self.ahead = ahead;
        self.windows_in_mode = 0;
        *self.rates_mut(ahead) = Recent::default();
        self.window = Window {
            warming_up: true,
            ..Window::default()
        };
    }
}

fn mode(ahead: bool) -> &'static str {
    if ahead {
        "ahead"
    } else {
        "in turn"
    }
}

/// The median of the last few samples: one slow window (a checkpoint, a scheduler hiccup)
/// does not move it.
#[derive(Debug, Clone, Default)]
struct Recent {
    samples: std::collections::VecDeque<f64>,
}

impl Recent {
    const KEPT: usize = Pace::TRIAL;

    fn add(&mut self, sample: f64) {
        if self.samples.len() == Self::KEPT {
            self.samples.pop_front();
        }
        self.samples.push_back(sample);
    }

    fn median(&self) -> Option<f64> {
        let mut sorted: Vec<f64> = self.samples.iter().copied().collect();
        sorted.sort_unstable_by(f64::total_cmp);
        sorted.get(sorted.len() / 2).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// A relay whose batches of 100 take `ahead` claiming ahead and `in_turn` claiming in
    /// turn (the whole cycle, as measured from one publish to the next), on a simulated clock.
    struct Sim {
        pace: Pace,
        now: Instant,
        /// Batches published claiming ahead, and in turn.
        batches: (usize, usize),
    }

    impl Sim {
        fn new() -> Self {
            Self {
                pace: Pace::default(),
                now: Instant::now(),
                batches: (0, 0),
            }
        }

        fn run(&mut self, batches: usize, (ahead, in_turn): (Duration, Duration)) -> &mut Self {
            for _ in 0..batches {
                if self.pace.ahead() {
                    self.now += ahead;
                    self.batches.0 += 1;
                } else {
                    self.now += in_turn;
                    self.batches.1 += 1;
                }
                self.pace.published(100, self.now);
            }
            self
        }

        /// Runs until no trial is under way, and says whether the relay then claims ahead.
        fn settled(&mut self, costs: (Duration, Duration)) -> bool {
            while self.pace.trying {
                self.run(1, costs);
            }
            self.pace.ahead()
        }
    }

    const MS: Duration = Duration::from_millis(1);
    /// Batches enough for a trial of both modes and a choice.
    const SETTLE: usize = 2 * (Pace::TRIAL + 2) * Pace::WINDOW;

    #[test]
    fn keeps_claiming_ahead_when_that_is_faster() {
        let mut sim = Sim::new();
        sim.run(SETTLE, (8 * MS, 10 * MS));
        assert!(sim.pace.ahead());
        sim.batches = (0, 0);
        sim.run(10_000, (8 * MS, 10 * MS));
        assert!(sim.settled((8 * MS, 10 * MS)));
        // Only the periodic trials claimed in turn: a few percent of the batches.
        assert!(sim.batches.1 * 10 < sim.batches.0, "{:?}", sim.batches);
    }

    #[test]
    fn claims_in_turn_when_that_is_faster() {
        // The Kafka case on 2 cores: overlapping the database with publishing slows both.
        let mut sim = Sim::new();
        sim.run(SETTLE, (18 * MS, 15 * MS));
        assert!(!sim.pace.ahead());
        sim.batches = (0, 0);
        sim.run(10_000, (18 * MS, 15 * MS));
        assert!(!sim.settled((18 * MS, 15 * MS)));
        assert!(sim.batches.0 * 10 < sim.batches.1, "{:?}", sim.batches);
    }

    #[test]
    fn follows_a_change_of_conditions_at_the_next_trial() {
        let mut sim = Sim::new();
        sim.run(SETTLE, (18 * MS, 15 * MS));
        assert!(!sim.pace.ahead());
        // The broker slows down: overlapping it with the database now pays.
        sim.run(
            (Pace::STALE_AFTER + SETTLE) * Pace::WINDOW,
            (30 * MS, 45 * MS),
        );
        assert!(sim.settled((30 * MS, 45 * MS)));
    }

    #[test]
    fn idle_rounds_do_not_count() {
        let mut pace = Pace::default();
        let start = Instant::now();
        // Batches that trickle in, each after an idle round, never make a window.
        for i in 1..=1000u32 {
            pace.published(1, start + i * 100 * MS);
            pace.interrupted();
        }
        assert!(pace.rates_ahead.samples.is_empty());
        assert!(pace.ahead());
    }

    #[test]
    fn a_claim_ahead_finding_nothing_switches_to_claiming_in_turn_until_the_next_trial() {
        let mut sim = Sim::new();
        sim.pace.found_nothing_ahead();
        assert!(!sim.pace.ahead());
        // Claiming in turn is measured and kept: the claim ahead counts as slower.
        sim.run(SETTLE, (MS, 15 * MS));
        assert!(!sim.pace.ahead());
        // At the next trial it is measured again.
        sim.run((Pace::STALE_AFTER + 2) * Pace::WINDOW, (MS, 15 * MS));
        assert!(sim.settled((MS, 15 * MS)));
    }

    #[test]
    fn one_slow_window_does_not_decide_a_trial() {
        let mut sim = Sim::new();
        // The first window claiming ahead is slow (a checkpoint): 30 ms a batch, against 8 ms
        // in the windows after it and 10 ms claiming in turn. Its median is 8 ms, its mean 15.
        sim.run(Pace::WINDOW + 1, (30 * MS, 10 * MS));
        sim.run(SETTLE, (8 * MS, 10 * MS));
        assert!(sim.settled((8 * MS, 10 * MS)));
    }
}
