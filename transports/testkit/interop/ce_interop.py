"""CloudEvents interop client for waybill's tests: real Python clients nobody here wrote.

Read what waybill published and parse it with the official `cloudevents` SDK, printing one JSON
object per event on stdout; or send CloudEvents for a waybill consumer. Run by the Rust tests
(`waybill_testkit::interop`) with the interpreter in WAYBILL_INTEROP_PYTHON, which `.ci/run`
creates from `.ci/interop/requirements.txt`.

    read-amqp  ADDR QUEUE COUNT        pika basic_get + cloudevents rabbitmq.from_binary
    read-nats  URL STREAM COUNT        nats-py JetStream get_msg + http.from_binary (ce- headers,
                                       percent-decoded) and the raw headers checked field by field
    read-kafka BROKERS TOPIC COUNT     confluent-kafka + cloudevents kafka.from_binary
    send-amqp  ADDR QUEUE SPEC...      pika, to the default exchange with routing key QUEUE
    send-nats  URL SUBJECT SPEC...     nats-py JetStream publish
    send-kafka BROKERS TOPIC SPEC...   confluent-kafka produce

A SPEC is MODE:ID with MODE binary, structured or native (broker properties only: AMQP
message_id/type/timestamp, NATS Nats-Msg-Id). Every event is sent twice, as an at-least-once
producer would; its data is {"id": ID}.
"""

import asyncio
import json
import sys
import time
import urllib.parse
import uuid
from datetime import datetime, timezone

from cloudevents.core.bindings import http, kafka, rabbitmq
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent

SOURCE = "/python/interop"
TYPE = "com.example.interop.created"


def emit(event, **extra):
    """Prints one parsed event as a JSON line."""
    attributes = dict(event.get_attributes())
    attributes["time"] = event.get_time().isoformat() if event.get_time() else None
    data = event.get_data()
    if isinstance(data, bytes):
        data = {"bytes": list(data)}
    print(json.dumps({"attributes": attributes, "data": data, **extra}), flush=True)


def event_for(event_id):
    return CloudEvent(
        attributes={
            "id": event_id,
            "source": SOURCE,
            "type": TYPE,
            "datacontenttype": "application/json",
            "time": datetime.now(timezone.utc),
            "partitionkey": "python-key",
        },
        data={"id": event_id},
    )


def specs(args):
    for spec in args:
        mode, _, event_id = spec.partition(":")
        if mode not in ("binary", "structured", "native") or not event_id:
            raise SystemExit(f"bad spec {spec!r}: MODE:ID with MODE binary, structured or native")
        yield mode, event_id


# RabbitMQ (AMQP 0-9-1) -------------------------------------------------------------------------


def amqp_connection(addr):
    import pika

    return pika.BlockingConnection(pika.URLParameters(addr))


def read_amqp(addr, queue, count):
    connection = amqp_connection(addr)
    channel = connection.channel()
    got, deadline = 0, time.monotonic() + 60
    while got < count:
        if time.monotonic() > deadline:
            raise SystemExit(f"only {got} of {count} messages in {queue}")
        method, properties, body = channel.basic_get(queue, auto_ack=True)
        if method is None:
            time.sleep(0.1)
            continue
        headers = {k: v for k, v in (properties.headers or {}).items()}
        message = rabbitmq.RabbitMQMessage(
            headers={k: v for k, v in headers.items() if isinstance(v, str)},
            content_type=properties.content_type,
            body=body,
        )
        event = rabbitmq.from_binary(message, JSONFormat(), CloudEvent)
        emit(
            event,
            native={
                "message_id": properties.message_id,
                "type": properties.type,
                "timestamp": properties.timestamp,
                "content_type": properties.content_type,
            },
        )
        got += 1
    connection.close()


def send_amqp(addr, queue, args):
    import pika

    connection = amqp_connection(addr)
    channel = connection.channel()
    channel.confirm_delivery()
    for mode, event_id in specs(args):
        event = event_for(event_id)
        if mode == "binary":
            message = rabbitmq.to_binary(event, JSONFormat())
            properties = pika.BasicProperties(
                headers=message.headers, content_type=message.content_type
            )
            body = message.body
        elif mode == "structured":
            message = rabbitmq.to_structured(event, JSONFormat())
            properties = pika.BasicProperties(content_type=message.content_type)
            body = message.body
        else:
            properties = pika.BasicProperties(
                message_id=event_id,
                type=TYPE,
                timestamp=int(time.time()),
                content_type="application/json",
            )
            body = json.dumps({"id": event_id}).encode()
        for _ in range(2):
            channel.basic_publish("", queue, body, properties)
    connection.close()


# NATS ------------------------------------------------------------------------------------------


async def read_nats(url, stream, count):
    import nats

    nc = await nats.connect(url)
    js = nc.jetstream()
    for seq in range(1, count + 1):
        raw = await js.get_msg(stream, seq)
        headers = dict(raw.headers or {})
        event = http.from_binary(http.HTTPMessage(headers=headers, body=raw.data), JSONFormat())
        # The NATS binding field by field: every ce- header percent-decodes to the attribute.
        for name, value in headers.items():
            if name.lower().startswith("ce-") and name.lower() != "ce-time":
                attribute = name.lower()[3:]
                assert event.get_attributes()[attribute] == urllib.parse.unquote(value), name
        emit(event, nats_msg_id=headers.get("Nats-Msg-Id"), subject=raw.subject)
    await nc.close()


async def send_nats(url, subject, args):
    import nats

    nc = await nats.connect(url)
    js = nc.jetstream()
    for mode, event_id in specs(args):
        event = event_for(event_id)
        if mode == "binary":
            message = http.to_binary(event, JSONFormat())
            headers, body = message.headers, message.body
        elif mode == "structured":
            message = http.to_structured(event, JSONFormat())
            headers, body = message.headers, message.body
        else:
            headers = {"Nats-Msg-Id": event_id, "content-type": "application/json"}
            body = json.dumps({"id": event_id}).encode()
        for _ in range(2):
            await js.publish(subject, body, headers=headers)
    await nc.close()


# Kafka -----------------------------------------------------------------------------------------


def read_kafka(brokers, topic, count):
    from confluent_kafka import Consumer

    consumer = Consumer(
        {
            "bootstrap.servers": brokers,
            "group.id": f"interop-{uuid.uuid4()}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "session.timeout.ms": 6000,
            "max.poll.interval.ms": 7000,
        }
    )
    consumer.subscribe([topic])
    got, deadline = 0, time.monotonic() + 60
    while got < count:
        if time.monotonic() > deadline:
            raise SystemExit(f"only {got} of {count} records in {topic}")
        record = consumer.poll(1.0)
        if record is None:
            continue
        if record.error():
            raise SystemExit(f"kafka: {record.error()}")
        message = kafka.KafkaMessage(
            headers=dict(record.headers() or []), key=record.key(), value=record.value()
        )
        event = kafka.from_binary(message, JSONFormat(), CloudEvent)
        emit(event, key=(record.key() or b"").decode())
        got += 1
    consumer.close()


def send_kafka(brokers, topic, args):
    from confluent_kafka import Producer

    producer = Producer({"bootstrap.servers": brokers, "enable.idempotence": True})
    for mode, event_id in specs(args):
        event = event_for(event_id)
        if mode == "native":
            raise SystemExit("Kafka has no native message id")
        convert = kafka.to_binary if mode == "binary" else kafka.to_structured
        message = convert(event, JSONFormat())
        for _ in range(2):
            producer.produce(
                topic, message.value, key=message.key, headers=list(message.headers.items())
            )
    if producer.flush(30) != 0:
        raise SystemExit("kafka: records not delivered")


def main(argv):
    if len(argv) < 4:
        raise SystemExit(__doc__)
    command, target, name, rest = argv[0], argv[1], argv[2], argv[3:]
    if command == "read-amqp":
        read_amqp(target, name, int(rest[0]))
    elif command == "read-nats":
        asyncio.run(read_nats(target, name, int(rest[0])))
    elif command == "read-kafka":
        read_kafka(target, name, int(rest[0]))
    elif command == "send-amqp":
        send_amqp(target, name, rest)
    elif command == "send-nats":
        asyncio.run(send_nats(target, name, rest))
    elif command == "send-kafka":
        send_kafka(target, name, rest)
    else:
        raise SystemExit(f"unknown command {command!r}\n{__doc__}")


if __name__ == "__main__":
    main(sys.argv[1:])
