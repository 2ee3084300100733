//! The orders service's HTTP API: `POST /orders` places an order, `GET /orders/{id}` reads it.
//!
//! It has no authentication and no TLS: an example, bound to loopback by default. Do not expose
//! it as it is; put an authenticating TLS proxy in front of a real service.

use std::io::Read;

use tiny_http::{Header, Method, Request, Response, Server};

use crate::db::{AppConnection, DbPool};
use crate::orders::{place_order, validate};
use crate::Error;

/// The body of `POST /orders`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct NewOrder {
    customer: String,
    amount_cents: i64,
}

/// The biggest request body read, so a client cannot make the service buffer gigabytes.
const MAX_BODY_BYTES: u64 = 64 * 1024;

/// Serves the API on `server` until the process ends, one request at a time.
pub(crate) fn serve<C: AppConnection>(server: &Server, db: &DbPool<C>) {
    for mut request in server.incoming_requests() {
        let (status, body) = match route(&mut request, db) {
            Ok(answer) => answer,
            Err(error) => {
                log::error!("{} {} failed: {error}", request.method(), request.url());
                (500, serde_json::json!({"error": "internal error"}))
            }
        };
        let mut response = Response::from_string(body.to_string()).with_status_code(status);
        if let Ok(header) = Header::from_bytes(&b"Content-Type"[..], &b"application/json"[..]) {
            response = response.with_header(header);
        }
        if let Err(error) = request.respond(response) {
            log::warn!("answering a request failed: {error}");
        }
    }
}

type Answer = (u16, serde_json::Value);

fn route<C: AppConnection>(request: &mut Request, db: &DbPool<C>) -> Result<Answer, Error> {
    let path = request
        .url()
        .split('?')
        .next()
        .unwrap_or_default()
        .to_owned();
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    match (request.method(), segments.as_slice()) {
        (Method::Post, ["orders"]) => create(request, db),
        (Method::Get, ["orders", id]) => match id.parse::<i64>() {
            Ok(id) => match db.get()?.find_order(id)? {
                Some(order) => Ok((200, serde_json::to_value(order)?)),
                None => Ok(error(404, format!("no order {id}"))),
            },
            Err(_) => Ok(error(404, format!("no order {id:?}"))),
        },
        (_, ["orders"] | ["orders", _]) => Ok(error(405, "method not allowed")),
        _ => Ok(error(404, "not found")),
    }
}

fn create<C: AppConnection>(request: &mut Request, db: &DbPool<C>) -> Result<Answer, Error> {
    let mut body = Vec::new();
    request
        .as_reader()
        .take(MAX_BODY_BYTES + 1)
        .read_to_end(&mut body)?;
    if body.len() as u64 > MAX_BODY_BYTES {
        return Ok(error(413, "request body too large"));
    }
    let new: NewOrder = match serde_json::from_slice(&body) {
        Ok(new) => new,
        Err(e) => return Ok(error(400, format!("invalid order JSON: {e}"))),
    };
    if let Err(reason) = validate(&new.customer, new.amount_cents) {
        return Ok(error(422, reason));
    }
    let order = place_order(&mut *db.get()?, &new.customer, new.amount_cents)?;
    Ok((201, serde_json::to_value(order)?))
}

fn error(status: u16, message: impl Into<String>) -> Answer {
    (status, serde_json::json!({ "error": message.into() }))
}
