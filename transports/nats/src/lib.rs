//! NATS JetStream transport for waybill: a publisher with Nats-Msg-Id dedup and acks, and a durable pull consumer loop.
