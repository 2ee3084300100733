// Throwaway: our NATS publisher alone vs raw async-nats, no database.
use futures_util::future::join_all;
use std::future::IntoFuture;
use std::time::{Duration, Instant};
use waybill_inbox_core::wire;
use waybill_outbox_core::{MessageId, OutboxMessage, Publisher, Status};

fn messages(topic: &str, count: usize) -> Vec<OutboxMessage> {
    (0..count)
        .map(|i| {
            let mut msg = OutboxMessage::new(i as i64 + 1, MessageId::new(), Status::Pending);
            msg.topic = topic.to_owned();
            msg.partition_key = format!("order:{}", i % 1000);
            msg.message_type = "OrderPlaced".into();
            msg.content_type = "application/json".into();
            msg.payload = vec![b'x'; 300];
            msg.created_at = chrono::Utc::now();
            msg
        })
        .collect()
}

fn main() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _e = rt.enter();
    let client = rt
        .block_on(async_nats::connect("nats://127.0.0.1:4222"))
        .unwrap();
    let js = async_nats::jetstream::new(client);
    let name = "natsonly";
    let _ = rt.block_on(js.delete_stream(name));
    rt.block_on(
        js.get_or_create_stream(async_nats::jetstream::stream::Config {
            name: name.into(),
            subjects: vec![name.into()],
            duplicate_window: Duration::from_secs(120),
            ..Default::default()
        }),
    )
    .unwrap();
    let mut ours = waybill_nats::NatsPublisher::connect(
        "nats://127.0.0.1:4222",
        waybill_nats::PublisherConfig::default(),
    )
    .unwrap();
    for _ in 0..3 {
        let msgs = messages(name, 20000);
        let t = Instant::now();
        for b in msgs.chunks(1000) {
            let r = ours.publish(b);
            assert!(r.iter().all(|r| r.is_ok()));
        }
        let a = 20000.0 / t.elapsed().as_secs_f64();
        let msgs = messages(name, 20000);
        let t = Instant::now();
        rt.block_on(async {
            for b in msgs.chunks(1000) {
                let mut acks = vec![];
                for msg in b {
                    let (headers, body) = wire::encode(msg);
                    let mut map = async_nats::HeaderMap::new();
                    for (n, v) in &headers {
                        map.insert(n.as_str(), v.as_str());
                    }
                    map.insert("Nats-Msg-Id", msg.id.to_string().as_str());
                    acks.push(
                        js.publish_with_headers(msg.topic.clone(), map, body.into())
                            .await
                            .unwrap(),
                    );
                }
                for ack in join_all(acks.into_iter().map(IntoFuture::into_future)).await {
                    ack.unwrap();
                }
            }
        });
        let b = 20000.0 / t.elapsed().as_secs_f64();
        println!("ours {a:.0}/s raw {b:.0}/s ratio {:.2}", a / b);
    }
    rt.block_on(js.delete_stream(name)).unwrap();
}
