#![allow(clippy::expect_used, clippy::unwrap_used)]
//! Command lines the binary refuses, with a message that says what to do instead.

mod common;

use common::order_service;

#[cfg(not(feature = "mysql"))]
#[test]
fn a_mysql_url_without_the_mysql_feature_says_how_to_get_it() {
    let output = order_service()
        .args([
            "--orders-db",
            "mysql://root@127.0.0.1:3306/orders",
            "report",
        ])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--features mysql"), "{stderr}");
}

#[test]
fn an_unknown_database_or_broker_scheme_is_refused_with_the_choices() {
    for args in [
        &["--orders-db", "oracle://db/orders", "report"][..],
        &["--broker", "redis://127.0.0.1:6379", "billing"][..],
    ] {
        let output = order_service().args(args).output().unwrap();
        assert!(!output.status.success(), "{args:?}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains("use "), "{args:?}: {stderr}");
    }
}
