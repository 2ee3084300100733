//! `RelayConfig` keeps every setting within what the stores accept.

use std::time::Duration;

use waybill_outbox_core::RelayConfig;

#[test]
fn an_overlong_lease_is_clamped_to_the_maximum() {
    let config = RelayConfig::default().lease(Duration::from_secs(10 * 365 * 24 * 60 * 60));
    assert_eq!(config.lease_duration(), RelayConfig::MAX_LEASE);
    let config = RelayConfig::default().lease(Duration::MAX);
    assert_eq!(config.lease_duration(), RelayConfig::MAX_LEASE);
}

#[test]
fn a_zero_lease_is_raised_to_the_minimum() {
    let config = RelayConfig::default().lease(Duration::ZERO);
    assert_eq!(config.lease_duration(), RelayConfig::MIN_LEASE);
}

#[test]
fn a_lease_within_bounds_is_kept() {
    for lease in [
        RelayConfig::MIN_LEASE,
        Duration::from_secs(30),
        RelayConfig::MAX_LEASE,
    ] {
        assert_eq!(RelayConfig::default().lease(lease).lease_duration(), lease);
    }
}

#[test]
fn batch_sizes_are_clamped_to_one_and_the_maximum() {
    assert_eq!(RelayConfig::default().batch_size(0).batch_limit(), 1);
    assert_eq!(
        RelayConfig::default().batch_size(usize::MAX).batch_limit(),
        RelayConfig::MAX_BATCH_SIZE
    );
    assert_eq!(
        RelayConfig::default()
            .batch_size(RelayConfig::MAX_BATCH_SIZE)
            .batch_limit(),
        RelayConfig::MAX_BATCH_SIZE
    );
}
