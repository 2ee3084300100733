//! The relay to real brokers against the broker's raw confirmed-publish rate with the same
//! client, batch size and messages, alternating: RabbitMQ with publisher confirms (lapin) and
//! NATS JetStream with publish acks (async-nats) and Kafka with `acks=all` and idempotence
//! (rdkafka), confirms pipelined per batch on both sides.

use std::collections::BTreeMap;
use std::future::IntoFuture;
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, ExchangeDeleteOptions,
    QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions, QueuePurgeOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Confirmation, Connection, ConnectionProperties, ExchangeKind};
use tokio::runtime::Runtime;
use waybill_amqp::AmqpPublisher;
use waybill_inbox_core::wire;
use waybill_nats::NatsPublisher;
use waybill_outbox_core::{MessageId, OutboxMessage, Publisher, RelayConfig, Status};

use crate::common::{
    alternate_all, drain, drain_pipelined, empty_outbox, fill_pg, median, payload, record_pair,
    row, CpuMeter, Error, Figures, PgPool, Settings,
};
use crate::floor;

const BATCH: usize = 1000;

/// The messages the raw publishers send: what the relay would hand its publisher.
fn messages(topic: &str, count: usize) -> Vec<OutboxMessage> {
    (0..count)
        .map(|i| {
            let mut msg = OutboxMessage::new(i as i64 + 1, MessageId::new(), Status::Pending);
            msg.topic = topic.to_owned();
            msg.partition_key = format!("order:{}", i % 1000);
            msg.message_type = "OrderPlaced".into();
            msg.content_type = "application/json".into();
            msg.payload = payload(i).to_string().into_bytes();
            msg.created_at = chrono::Utc::now();
            msg
        })
        .collect()
}

/// One drain of `count` messages by the relay: its rate, and the cores busy meanwhile.
fn relay_round<P: Publisher + Send + 'static>(
    pool: &PgPool,
    topic: &str,
    count: usize,
    mut publisher: impl FnMut() -> Result<P, Error>,
    pipelined: bool,
) -> Result<(f64, CpuMeter), Error> {
    empty_outbox(&mut *pool.get()?)?;
    fill_pg(&mut *pool.get()?, topic, count, 0)?;
    let config = RelayConfig::default().batch_size(BATCH);
    let mut cpu = CpuMeter::start();
    let rate = if pipelined {
        // The next claim and the last write-back overlap the broker's confirms.
        drain_pipelined(pool, count, config, publisher()?, Some(&mut cpu))?
    } else {
        drain(pool, count, 1, config, publisher)?
    };
    Ok((rate, cpu))
}

/// One drain of `count` messages by the SQL floor feeding the raw client: a thread takes batches
/// with the floor's `DELETE .. RETURNING` (at most once, no lease, no write-back) and `raw`
/// publishes each while the next is taken, as a pipelined relay claims ahead. No relay does less
/// database work per message: a relay's ceiling with this database, broker and client here.
fn floor_round(
    pool: &PgPool,
    topic: &str,
    count: usize,
    raw: &mut dyn FnMut(&[OutboxMessage]) -> Result<f64, Error>,
) -> Result<f64, Error> {
    empty_outbox(&mut *pool.get()?)?;
    fill_pg(&mut *pool.get()?, topic, count, 0)?;
    let mut conn = pool.get()?;
    // A rendezvous: the taker holds at most one batch ahead of the one being published.
    let (batches, taken) = std::sync::mpsc::sync_channel::<Vec<OutboxMessage>>(0);
    let began = Instant::now();
    let taker = std::thread::spawn(move || -> Result<(), Error> {
        loop {
            let batch = floor::take(&mut conn, BATCH)?;
            if batch.is_empty() || batches.send(batch).is_err() {
                return Ok(());
            }
        }
    });
    let mut published = 0;
    for batch in taken {
        raw(&batch)?;
        published += batch.len();
    }
    let elapsed = began.elapsed();
    taker.join().map_err(|_| "the floor's taker panicked")??;
    if published != count {
        return Err(format!("the floor published {published} of {count}").into());
    }
    Ok(count as f64 / elapsed.as_secs_f64())
}

/// The cores busy during one round: all of them, and by kind of process.
struct Cores {
    total: f64,
    by_process: BTreeMap<String, f64>,
}

impl Cores {
    fn of(cpu: &CpuMeter) -> Option<Self> {
        Some(Self {
            total: cpu.busy_cores()?,
            by_process: cpu.busy_by_process(),
        })
    }

    /// The median of each figure over `rounds` (a process missing from a round counts 0).
    fn median(rounds: &[Cores]) -> Option<Self> {
        if rounds.is_empty() {
            return None;
        }
        let names: std::collections::BTreeSet<&String> =
            rounds.iter().flat_map(|r| r.by_process.keys()).collect();
        let by_process = names
            .into_iter()
            .map(|name| {
                let busy = rounds
                    .iter()
                    .map(|r| r.by_process.get(name).copied().unwrap_or(0.0));
                (name.clone(), median(busy.collect()))
            })
            .collect();
        Some(Self {
            total: median(rounds.iter().map(|r| r.total).collect()),
            by_process,
        })
    }
}

pub fn run(settings: &Settings, pool: &PgPool, figures: &mut Figures) -> Result<(), Error> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let count = settings.pick(5_000, 50_000);
    let name = format!("{}_broker", settings.schema);
    let amqp = amqp(settings, pool, &runtime, &name, count);
    report(
        figures,
        "amqp",
        "RabbitMQ (confirms) vs raw lapin",
        count,
        amqp,
        &settings.amqp_addr,
    );
    let nats = nats(settings, pool, &runtime, &name, count);
    report(
        figures,
        "nats",
        "NATS JetStream (acks) vs raw async-nats",
        count,
        nats,
        &settings.nats_url,
    );
    let kafka = kafka(settings, pool, &runtime, &name, count);
    report(
        figures,
        "kafka",
        "Kafka (acks=all, idempotent) vs raw rdkafka",
        count,
        kafka,
        &settings.kafka_brokers,
    );
    empty_outbox(&mut *pool.get()?)?;
    Ok(())
}

/// Alternates the relay in rounds, the pipelined relay (publishers from `publisher`), `raw`, the
/// publisher alone and the SQL floor feeding `raw`, over `count` messages of the topic `name`,
/// emptying the broker's queue or stream with `purge` before each round; returns their medians.
fn compare<P: Publisher + Send + 'static>(
    rounds: usize,
    (pool, name, count): (&PgPool, &str, usize),
    purge: impl Fn() -> Result<(), Error>,
    mut publisher: impl FnMut() -> Result<P, Error>,
    mut raw: impl FnMut(&[OutboxMessage]) -> Result<f64, Error>,
) -> Result<Rates, Error> {
    let publisher = std::cell::RefCell::new(&mut publisher);
    let raw = std::cell::RefCell::new(&mut raw);
    // Cores busy in each round of the pipelined relay and of the raw client.
    let busy = std::cell::RefCell::new([Vec::new(), Vec::new()]);
    let relay = |pipelined| -> Result<f64, Error> {
        purge()?;
        let (rate, cpu) = relay_round(pool, name, count, &mut **publisher.borrow_mut(), pipelined)?;
        if pipelined {
            busy.borrow_mut()[0].extend(Cores::of(&cpu));
        }
        Ok(rate)
    };
    // The publisher alone, no database: what the relay's publishing costs on its own.
    let alone = || -> Result<f64, Error> {
        purge()?;
        let mut publisher = (*publisher.borrow_mut())()?;
        let messages = messages(name, count);
        let began = Instant::now();
        for batch in messages.chunks(BATCH) {
            if let Some(Err(error)) = publisher.publish(batch).into_iter().find(Result::is_err) {
                return Err(format!("the publisher alone failed: {error}").into());
            }
        }
        Ok(messages.len() as f64 / began.elapsed().as_secs_f64())
    };
    let medians = alternate_all(
        rounds,
        &mut [
            &mut || relay(false),
            &mut || relay(true),
            &mut || {
                purge()?;
                let messages = messages(name, count);
                let cpu = CpuMeter::start();
                let rate = (*raw.borrow_mut())(&messages)?;
                busy.borrow_mut()[1].extend(Cores::of(&cpu));
                Ok(rate)
            },
            &mut { alone },
            &mut || {
                purge()?;
                floor_round(pool, name, count, &mut **raw.borrow_mut())
            },
        ],
    )?;
    let [relay_busy, raw_busy] = busy.into_inner();
    let busy = Cores::median(&relay_busy).zip(Cores::median(&raw_busy));
    Ok(Rates {
        sequential: medians[0],
        pipelined: medians[1],
        raw: medians[2],
        alone: medians[3],
        floor: medians[4],
        busy,
    })
}

/// Medians of one broker's comparison, msg/s; and the cores busy (pipelined relay, raw client).
struct Rates {
    sequential: f64,
    pipelined: f64,
    raw: f64,
    alone: f64,
    /// The SQL floor feeding the raw client.
    floor: f64,
    busy: Option<(Cores, Cores)>,
}

fn report(
    figures: &mut Figures,
    broker: &str,
    what: &str,
    count: usize,
    result: Result<Rates, Error>,
    at: &str,
) {
    let Rates {
        sequential,
        pipelined,
        raw,
        alone,
        floor,
        busy,
    } = match result {
        Ok(rates) => rates,
        Err(error) => return eprintln!("SKIPPED: {broker} at {at}: {error}"),
    };
    let scenario = |mode: &str| {
        format!("relay ({mode}) -> {what} publishing pipelined per batch, {count} messages, batch {BATCH}")
    };
    record_pair(
        figures,
        &scenario("`run_pipelined`"),
        (pipelined, raw),
        [
            format!("{broker}_relay_msgs_per_s"),
            format!("{broker}_raw_msgs_per_s"),
            format!("{broker}_vs_raw"),
        ],
        "msg/s",
    );
    record_pair(
        figures,
        &format!(
            "the publisher alone (no database) -> {what}, {count} messages, batches of {BATCH}"
        ),
        (alone, raw),
        [
            format!("{broker}_publisher_msgs_per_s"),
            format!("{broker}_raw_msgs_per_s"),
            format!("{broker}_publisher_vs_raw"),
        ],
        "msg/s",
    );
    record_pair(
        figures,
        &format!(
            "the SQL floor feeding the raw client -> {what}: `DELETE .. RETURNING` batches of {BATCH} (at most once), each published while the next is taken, {count} messages"
        ),
        (floor, raw),
        [
            format!("{broker}_floor_msgs_per_s"),
            format!("{broker}_raw_msgs_per_s"),
            format!("{broker}_floor_vs_raw"),
        ],
        "msg/s",
    );
    record_pair(
        figures,
        &format!("the pipelined relay vs that floor feeding the raw client -> {what}"),
        (pipelined, floor),
        [
            format!("{broker}_relay_msgs_per_s"),
            format!("{broker}_floor_msgs_per_s"),
            format!("{broker}_vs_floor"),
        ],
        "msg/s",
    );
    record_pair(
        figures,
        &scenario("`run`: claim, publish, write back in turn"),
        (sequential, raw),
        [
            format!("{broker}_relay_sequential_msgs_per_s"),
            format!("{broker}_raw_msgs_per_s"),
            format!("{broker}_sequential_vs_raw"),
        ],
        "msg/s",
    );
    if let Some((relay_busy, raw_busy)) = busy {
        let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
        row(
            &format!("cores busy (of {cores}; every process: database, broker, clients) while the pipelined relay vs the raw client publish to {broker}"),
            &format!("{:.2}", relay_busy.total),
            &format!("{:.2}", raw_busy.total),
            "",
        );
        figures.set(format!("{broker}_relay_busy_cores"), relay_busy.total);
        figures.set(format!("{broker}_raw_busy_cores"), raw_busy.total);
        // Whose work it was: `bench` is the relay's threads (claims, write-backs, encoding)
        // in relay rounds and the raw client in raw rounds.
        let names: std::collections::BTreeSet<&String> = relay_busy
            .by_process
            .keys()
            .chain(raw_busy.by_process.keys())
            .collect();
        for name in names {
            let relay = relay_busy.by_process.get(name).copied().unwrap_or(0.0);
            let raw = raw_busy.by_process.get(name).copied().unwrap_or(0.0);
            if relay.max(raw) < 0.02 {
                continue;
            }
            row(
                &format!("  of which {name}"),
                &format!("{relay:.2}"),
                &format!("{raw:.2}"),
                "",
            );
            let field = name.replace(|c: char| !c.is_ascii_alphanumeric(), "_");
            figures.set(format!("{broker}_relay_cores_{field}"), relay);
            figures.set(format!("{broker}_raw_cores_{field}"), raw);
        }
    }
}

fn amqp(
    settings: &Settings,
    pool: &PgPool,
    runtime: &Runtime,
    name: &str,
    count: usize,
) -> Result<Rates, Error> {
    let connection = runtime.block_on(Connection::connect(
        &settings.amqp_addr,
        ConnectionProperties::default(),
    ))?;
    let channel = runtime.block_on(connection.create_channel())?;
    runtime.block_on(async {
        let durable = ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        };
        channel
            .exchange_declare(
                name.into(),
                ExchangeKind::Topic,
                durable,
                FieldTable::default(),
            )
            .await?;
        let durable = QueueDeclareOptions {
            durable: true,
            ..Default::default()
        };
        channel
            .queue_declare(name.into(), durable, FieldTable::default())
            .await?;
        channel
            .queue_bind(
                name.into(),
                name.into(),
                "#".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
    })?;
    let purge = || {
        runtime
            .block_on(channel.queue_purge(name.into(), QueuePurgeOptions::default()))
            .map(drop)
            .map_err(Error::from)
    };
    let result = compare(
        settings.rounds(),
        (pool, name, count),
        purge,
        || {
            Ok(AmqpPublisher::connect(
                &settings.amqp_addr,
                waybill_amqp::PublisherConfig::default(),
            )?)
        },
        |batch| runtime.block_on(raw_amqp(&channel, batch)),
    );
    runtime.block_on(async {
        channel
            .queue_delete(name.into(), QueueDeleteOptions::default())
            .await?;
        channel
            .exchange_delete(name.into(), ExchangeDeleteOptions::default())
            .await?;
        connection.close(200, "bench done".into()).await
    })?;
    result
}

/// Publishes `messages` in batches of [`BATCH`], each pipelined and then confirmed.
async fn raw_amqp(channel: &lapin::Channel, messages: &[OutboxMessage]) -> Result<f64, Error> {
    let began = Instant::now();
    for batch in messages.chunks(BATCH) {
        let mut confirms = Vec::with_capacity(batch.len());
        for msg in batch {
            let (headers, body) = wire::encode(msg);
            let mut table = FieldTable::default();
            for (name, value) in &headers {
                table.insert(
                    ShortString::from(name.as_str()),
                    AMQPValue::LongString(LongString::from(value.as_bytes())),
                );
            }
            let properties = BasicProperties::default()
                .with_message_id(msg.id.to_string().as_str().into())
                .with_type(msg.message_type.as_str().into())
                .with_content_type(msg.content_type.as_str().into())
                .with_delivery_mode(2)
                .with_headers(table);
            let options = BasicPublishOptions {
                mandatory: true,
                ..Default::default()
            };
            confirms.push(
                channel
                    .basic_publish(
                        msg.topic.as_str().into(),
                        msg.partition_key.as_str().into(),
                        options,
                        &body,
                        properties,
                    )
                    .await?,
            );
        }
        for confirm in confirms {
            match confirm.await? {
                Confirmation::Ack(None) => {}
                other => return Err(format!("raw publish not confirmed: {other:?}").into()),
            }
        }
    }
    Ok(messages.len() as f64 / began.elapsed().as_secs_f64())
}

fn nats(
    settings: &Settings,
    pool: &PgPool,
    runtime: &Runtime,
    name: &str,
    count: usize,
) -> Result<Rates, Error> {
    // The client spawns its tasks on the runtime it is made in.
    let _entered = runtime.enter();
    let client = runtime.block_on(async_nats::connect(&settings.nats_url))?;
    let jetstream = async_nats::jetstream::new(client);
    let config = async_nats::jetstream::stream::Config {
        name: name.to_owned(),
        subjects: vec![name.to_owned()],
        duplicate_window: Duration::from_secs(120),
        ..Default::default()
    };
    let stream = runtime.block_on(jetstream.get_or_create_stream(config))?;
    let purge = || -> Result<(), Error> {
        runtime.block_on(async { stream.purge().await })?;
        Ok(())
    };
    let result = compare(
        settings.rounds(),
        (pool, name, count),
        purge,
        || {
            Ok(NatsPublisher::connect(
                &settings.nats_url,
                waybill_nats::PublisherConfig::default(),
            )?)
        },
        |batch| runtime.block_on(raw_nats(&jetstream, batch)),
    );
    runtime.block_on(jetstream.delete_stream(name))?;
    result
}

/// Publishes `messages` in batches of [`BATCH`], each pipelined and then acknowledged.
async fn raw_nats(
    jetstream: &async_nats::jetstream::Context,
    messages: &[OutboxMessage],
) -> Result<f64, Error> {
    let began = Instant::now();
    for batch in messages.chunks(BATCH) {
        let mut acks = Vec::with_capacity(batch.len());
        for msg in batch {
            let (headers, body) = wire::encode(msg);
            let mut map = async_nats::HeaderMap::new();
            for (name, value) in &headers {
                map.insert(name.as_str(), value.as_str());
            }
            map.insert("Nats-Msg-Id", msg.id.to_string().as_str());
            acks.push(
                jetstream
                    .publish_with_headers(msg.topic.clone(), map, body.into())
                    .await?,
            );
        }
        for ack in join_all(acks.into_iter().map(IntoFuture::into_future)).await {
            ack?;
        }
    }
    Ok(messages.len() as f64 / began.elapsed().as_secs_f64())
}

fn kafka(
    settings: &Settings,
    pool: &PgPool,
    runtime: &Runtime,
    name: &str,
    count: usize,
) -> Result<Rates, Error> {
    use rdkafka::config::ClientConfig;
    use rdkafka::producer::FutureProducer;

    let brokers = settings.kafka_brokers.as_str();
    // Each round starts on an empty topic: deleted and created again.
    let purge = || -> Result<(), Error> {
        delete_kafka_topic(runtime, brokers, name)?;
        waybill_kafka::ensure_topic(brokers, name, 3)?;
        Ok(())
    };
    purge()?;
    // What the waybill publisher sets: acks from every replica, idempotence, a 1 ms linger.
    let raw: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("acks", "all")
        .set("enable.idempotence", "true")
        .set("linger.ms", "1")
        .create()?;
    let result = compare(
        settings.rounds(),
        (pool, name, count),
        purge,
        || {
            let publisher = waybill_kafka::KafkaPublisher::connect(
                brokers,
                waybill_kafka::PublisherConfig::default(),
            )?;
            // Connected before the clock starts, as the other brokers' publishers are: librdkafka
            // connects in the background and learns a new topic's leader and its producer id
            // on the first send, so one record warms it up.
            let mut publisher = publisher;
            if let Some(Err(error)) = publisher.publish(&messages(name, 1)).pop() {
                return Err(format!("warming up the Kafka publisher failed: {error}").into());
            }
            Ok(publisher)
        },
        |batch| runtime.block_on(raw_kafka(&raw, batch)),
    );
    delete_kafka_topic(runtime, brokers, name)?;
    result
}

fn delete_kafka_topic(runtime: &Runtime, brokers: &str, topic: &str) -> Result<(), Error> {
    use rdkafka::admin::{AdminClient, AdminOptions};
    use rdkafka::client::DefaultClientContext;
    use rdkafka::config::ClientConfig;

    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()?;
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    // A topic that does not exist yet is fine.
    let _ = runtime.block_on(admin.delete_topics(&[topic], &options))?;
    Ok(())
}

/// Sends `messages` in batches of [`BATCH`], each sent in full and then acknowledged.
async fn raw_kafka(
    producer: &rdkafka::producer::FutureProducer,
    messages: &[OutboxMessage],
) -> Result<f64, Error> {
    use rdkafka::message::{Header, OwnedHeaders};
    use rdkafka::producer::FutureRecord;

    let began = Instant::now();
    for batch in messages.chunks(BATCH) {
        let mut acks = Vec::with_capacity(batch.len());
        for msg in batch {
            let (headers, body) = wire::encode(msg);
            let mut record_headers = OwnedHeaders::new_with_capacity(headers.len());
            for (name, value) in &headers {
                record_headers = record_headers.insert(Header {
                    key: name,
                    value: Some(value.as_bytes()),
                });
            }
            let record = FutureRecord::to(&msg.topic)
                .payload(&body)
                .key(msg.partition_key.as_bytes())
                .headers(record_headers);
            acks.push(
                producer
                    .send_result(record)
                    .map_err(|(error, _)| format!("queueing a record failed: {error}"))?,
            );
        }
        for ack in join_all(acks).await {
            ack.map_err(|_| "a delivery was cancelled")?
                .map_err(|(error, _)| format!("a record was not acknowledged: {error}"))?;
        }
    }
    Ok(messages.len() as f64 / began.elapsed().as_secs_f64())
}
