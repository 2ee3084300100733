//! The in-process broker keeps the transport contract.

waybill_testkit::contract_tests!(Some(waybill_testkit::memory::MemoryHarness::new()));
