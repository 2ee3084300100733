//! Places orders from several threads, each order in its own transaction.

use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;

use crate::db::{AppConnection, DbPool};
use crate::orders::place_order;
use crate::Error;

/// How often one order is attempted before the writer gives up (SQLite may report the
/// database busy under contention; the transaction then rolled back and can be retried).
const ATTEMPTS: u32 = 5;

/// Places `count` orders on `concurrency` threads; returns how many were placed. When one
/// writer fails the others stop too, so the error comes back without waiting for the rest.
///
/// `fail_at` is a test hook: the writer whose turn it is to place that order number fails
/// instead, as a writer whose database went away would.
///
/// # Errors
///
/// An order failed [`ATTEMPTS`] times (or is `fail_at`), or a thread could not start.
pub(crate) fn place_orders<C: AppConnection>(
    db: &DbPool<C>,
    count: u64,
    concurrency: usize,
    fail_at: Option<u64>,
) -> Result<u64, Error> {
    let concurrency = u64::try_from(concurrency.max(1))?;
    let failed = AtomicBool::new(false);
    thread::scope(|scope| {
        let writers = (0..concurrency)
            .map(|writer| {
                // Writer w places orders w, w + concurrency, w + 2 * concurrency, ...
                let numbers = (writer..count).step_by(usize::try_from(concurrency)?);
                let failed = &failed;
                Ok(scope.spawn(move || -> Result<u64, Error> {
                    let mut placed = 0;
                    let place = || -> Result<(), Error> {
                        let mut conn = db.get()?;
                        for number in numbers {
                            if failed.load(Ordering::Relaxed) {
                                break;
                            }
                            if fail_at == Some(number) {
                                return Err(format!(
                                    "placing order {number} failed: injected by --fail-at-order"
                                )
                                .into());
                            }
                            place_with_retry(&mut *conn, number)?;
                            placed += 1;
                        }
                        Ok(())
                    };
                    let outcome = place();
                    if outcome.is_err() {
                        failed.store(true, Ordering::Relaxed);
                    }
                    outcome.map(|()| placed)
                }))
            })
            .collect::<Result<Vec<_>, Error>>()?;
        let mut placed = 0;
        let mut first_error = None;
        for writer in writers {
            match writer.join().map_err(|_| "an order writer panicked")? {
                Ok(n) => placed += n,
                Err(error) => {
                    first_error.get_or_insert(error);
                }
            }
        }
        first_error.map_or(Ok(placed), Err)
    })
}

fn place_with_retry<C: AppConnection>(conn: &mut C, number: u64) -> Result<(), Error> {
    let customer = format!("customer-{}", number % 100);
    let amount_cents = 100 + i64::try_from(number % 10_000)?;
    let mut attempt = 1;
    loop {
        match place_order(conn, &customer, amount_cents) {
            Ok(_) => return Ok(()),
            Err(error) if attempt < ATTEMPTS => {
                log::warn!("placing order {number} failed (attempt {attempt}/{ATTEMPTS}): {error}");
                attempt += 1;
            }
            Err(error) => return Err(error),
        }
    }
}
