#![allow(clippy::expect_used, clippy::unwrap_used)]
//! The orders HTTP API on SQLite: bad requests write nothing, a good order can be read back.

mod common;

use common::{http, report, serve_orders};

#[test]
fn bad_orders_are_refused_and_write_nothing_and_a_good_order_is_stored() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().to_str().unwrap();
    let db_args = ["--data-dir", data_dir];
    let (mut server, addr) = serve_orders(&db_args);

    for (body, status) in [
        ("{not json", 400),
        (r#"{"customer": "ada"}"#, 400),
        (r#"{"amount_cents": 1234}"#, 400),
        (r#"{"customer": "ada", "amount_cents": "12"}"#, 400),
        (r#"{"customer": "ada", "amount_cents": -5}"#, 422),
        (r#"{"customer": "ada", "amount_cents": 0}"#, 422),
        (r#"{"customer": " ", "amount_cents": 10}"#, 422),
    ] {
        let (got, answer) = http(&addr, "POST", "/orders", body);
        assert_eq!(got, status, "{body} -> {answer}");
        let answer: serde_json::Value = serde_json::from_str(&answer).unwrap();
        assert!(!answer["error"].as_str().unwrap().is_empty(), "{answer}");
    }
    assert_eq!(report(&db_args)["orders"], 0);

    let (status, created) = http(
        &addr,
        "POST",
        "/orders",
        r#"{"customer": "ada", "amount_cents": 1234}"#,
    );
    assert_eq!(status, 201, "{created}");
    let created: serde_json::Value = serde_json::from_str(&created).unwrap();
    assert_eq!(created["customer"], "ada");
    assert_eq!(created["amount_cents"], 1234);
    assert_eq!(created["paid"], false);

    let id = created["id"].as_i64().unwrap();
    let (status, fetched) = http(&addr, "GET", &format!("/orders/{id}"), "");
    assert_eq!(status, 200);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&fetched).unwrap(),
        created
    );
    assert_eq!(
        http(&addr, "GET", &format!("/orders/{}", id + 1), "").0,
        404
    );
    assert_eq!(http(&addr, "GET", "/orders/abc", "").0, 404);

    server.kill().unwrap();
    server.wait().unwrap();
    let after = report(&db_args);
    assert_eq!(after["orders"], 1);
    // The order's OrderPlaced waits in the outbox: no relay ran.
    assert_eq!(after["outbox_pending"], 1);
}
