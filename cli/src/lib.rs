//! The `waybill` binary's pieces that other binaries share: the broker connection flags
//! ([`connect`]), which the audit and the order service take too.

pub mod connect;
