//! One role per process, on real databases and a real broker.

use std::thread;

use tiny_http::Server;
use waybill_outbox_core::StopHandle;

use crate::billing::{self, BILLING_CONSUMER};
use crate::broker::Broker;
use crate::db::AppConnection;
use crate::embedded::{open, Service};
use crate::inbox::CountingInbox;
use crate::orders::{self, ORDERS_CONSUMER, ORDERS_TOPIC};
use crate::place::place_orders;
use crate::{billing::PAYMENTS_TOPIC, Error};

/// Relays `service`'s outbox to the broker until the process ends.
///
/// # Errors
///
/// The database or the broker could not be reached at start.
pub(crate) fn relay<C: AppConnection>(
    url: &str,
    service: Service,
    broker: &Broker,
) -> Result<(), Error> {
    broker.run_relay(open::<C>(url, 4, service)?, drop)?;
    Ok(())
}

/// Billing's consumer: charges each `OrderPlaced` once, until the process ends.
///
/// # Errors
///
/// The database or the broker could not be reached at start.
pub(crate) fn billing<C: AppConnection>(url: &str, broker: &Broker) -> Result<(), Error> {
    let db = open::<C>(url, 4, Service::Billing)?;
    let mut inbox = CountingInbox::new(db, BILLING_CONSUMER, billing::charge);
    broker.consume(
        ORDERS_TOPIC,
        BILLING_CONSUMER,
        &mut inbox,
        &StopHandle::new(),
    )
}

/// Places `count` orders straight through the orders database.
///
/// # Errors
///
/// The database could not be reached, or an order could not be placed.
pub(crate) fn place<C: AppConnection>(
    url: &str,
    count: u64,
    concurrency: usize,
) -> Result<(), Error> {
    let size = u32::try_from(concurrency)
        .unwrap_or(u32::MAX)
        .saturating_add(1);
    let placed = place_orders(
        &open::<C>(url, size, Service::Orders)?,
        count,
        concurrency,
        None,
    )?;
    println!("placed {placed} orders");
    Ok(())
}

/// The orders service: the HTTP API, plus the consumer that marks orders paid when a broker
/// is given.
///
/// # Errors
///
/// The database could not be reached or the address could not be bound.
pub(crate) fn serve_orders<C: AppConnection>(
    url: &str,
    listen: &str,
    broker: Option<Broker>,
) -> Result<(), Error> {
    let db = open::<C>(url, 8, Service::Orders)?;
    let server = Server::http(listen)?;
    // The first line tells scripts (and tests binding port 0) where to connect.
    println!("listening on http://{}", server.server_addr());
    match broker {
        Some(broker) => {
            let db = db.clone();
            thread::Builder::new()
                .name("orders consumer".into())
                .spawn(move || {
                    let mut inbox = CountingInbox::new(db, ORDERS_CONSUMER, orders::mark_paid);
                    let stop = StopHandle::new();
                    if let Err(error) =
                        broker.consume(PAYMENTS_TOPIC, ORDERS_CONSUMER, &mut inbox, &stop)
                    {
                        // Without its consumer the service would never mark orders paid.
                        log::error!("the PaymentCaptured consumer stopped: {error}");
                        std::process::exit(1);
                    }
                })?;
        }
        None => log::warn!("no --broker given: orders are placed but never marked paid"),
    }
    crate::http::serve(&server, &db);
    Ok(())
}
