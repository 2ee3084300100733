//! Kafka keeps the transport contract (skipped, naming `KAFKA_BROKERS`, when no broker is
//! reachable).

waybill_testkit::contract_tests!(waybill_testkit::kafka::KafkaHarness::new(), end_to_end);
