//! Event counts that survive SIGKILL: each worker appends one line per event to its own file
//! with an unbuffered write, so what the kernel took is kept when the process dies.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use crate::Error;

/// What a counted event was.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Event {
    /// Messages the broker confirmed to a relay (retries and duplicates included).
    Published,
    /// Deliveries handed to the consumer's handler (duplicates included).
    Delivery,
    /// Deliveries the inbox dropped as duplicates.
    DuplicateDropped,
    /// Injected transient handler failures, answered with a retry.
    HandlerRetry,
    /// Injected handler panics the consumer side caught.
    HandlerPanic,
    /// Injected failed statements the handler ignored.
    HandlerIgnoredError,
    /// Deliveries reported handled on a connection still inside a transaction: never
    /// committed.
    HandledUncommitted,
}

impl Event {
    fn tag(self) -> &'static str {
        match self {
            Self::Published => "published",
            Self::Delivery => "delivery",
            Self::DuplicateDropped => "duplicate",
            Self::HandlerRetry => "handler-retry",
            Self::HandlerPanic => "handler-panic",
            Self::HandlerIgnoredError => "handler-ignored-error",
            Self::HandledUncommitted => "handled-uncommitted",
        }
    }

    fn from_tag(tag: &str) -> Option<Self> {
        [
            Self::Published,
            Self::Delivery,
            Self::DuplicateDropped,
            Self::HandlerRetry,
            Self::HandlerPanic,
            Self::HandlerIgnoredError,
            Self::HandledUncommitted,
        ]
        .into_iter()
        .find(|event| event.tag() == tag)
    }
}

/// Appends events to one file; clones share it.
#[derive(Clone, Debug)]
pub(crate) struct Counter {
    file: Arc<Mutex<File>>,
}

impl Counter {
    /// A new counter file in `dir`, named after `name` and the process.
    ///
    /// # Errors
    ///
    /// The file could not be created.
    pub(crate) fn create(dir: &Path, name: &str) -> Result<Self, Error> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join(format!(
            "{name}-{}-{}.events",
            std::process::id(),
            uuid::Uuid::new_v4().simple()
        ));
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        Ok(Self {
            file: Arc::new(Mutex::new(file)),
        })
    }

    /// Counts `n` events of a kind.
    pub(crate) fn add(&self, event: Event, n: u64) {
        if n == 0 {
            return;
        }
        let mut file = self.file.lock().unwrap_or_else(PoisonError::into_inner);
        if let Err(error) = writeln!(file, "{} {n}", event.tag()) {
            // A lost count shows in the table; it must not stop the pipeline.
            log::warn!("counting {} failed: {error}", event.tag());
        }
    }
}

/// The sums of every counter file in `dir`.
///
/// # Errors
///
/// The folder could not be read.
pub(crate) fn totals(dir: &Path) -> Result<HashMap<Event, u64>, Error> {
    let mut totals = HashMap::new();
    for entry in std::fs::read_dir(dir)? {
        let path: PathBuf = entry?.path();
        if path.extension().is_none_or(|ext| ext != "events") {
            continue;
        }
        for line in std::fs::read_to_string(&path)?.lines() {
            // A process killed mid-line leaves a torn last line: skip it.
            let Some((tag, n)) = line.split_once(' ') else {
                continue;
            };
            if let (Some(event), Ok(n)) = (Event::from_tag(tag), n.parse::<u64>()) {
                *totals.entry(event).or_insert(0) += n;
            }
        }
    }
    Ok(totals)
}
