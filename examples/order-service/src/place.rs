//! Places orders from several threads, each order in its own transaction.

use std::thread;

use crate::db::{AppConnection, DbPool};
use crate::orders::place_order;
use crate::Error;

/// How often one order is attempted before the writer gives up (SQLite may report the
/// database busy under contention; the transaction then rolled back and can be retried).
const ATTEMPTS: u32 = 5;

/// Places `count` orders on `concurrency` threads; returns how many were placed.
///
/// # Errors
///
/// An order failed [`ATTEMPTS`] times, or a thread could not start.
pub(crate) fn place_orders<C: AppConnection>(
    db: &DbPool<C>,
    count: u64,
    concurrency: usize,
) -> Result<u64, Error> {
    let concurrency = u64::try_from(concurrency.max(1))?;
    thread::scope(|scope| {
        let writers = (0..concurrency)
            .map(|writer| {
                // Writer w places orders w, w + concurrency, w + 2 * concurrency, ...
                let numbers = (writer..count).step_by(usize::try_from(concurrency)?);
                Ok(scope.spawn(move || -> Result<u64, Error> {
                    let mut conn = db.get()?;
                    let mut placed = 0;
                    for number in numbers {
                        place_with_retry(&mut *conn, number)?;
                        placed += 1;
                    }
                    Ok(placed)
                }))
            })
            .collect::<Result<Vec<_>, Error>>()?;
        let mut placed = 0;
        for writer in writers {
            placed += writer.join().map_err(|_| "an order writer panicked")??;
        }
        Ok(placed)
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
