//! RabbitMQ (AMQP 0-9-1) transport for waybill: a confirmed publisher for the relay and an inbox consumer loop.
