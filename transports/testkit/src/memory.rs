//! The in-process broker under the contract.

use waybill_inbox_core::{ConsumeReport, DeliveryHandler, RetryPolicy};
use waybill_memory::{MemoryBroker, MemoryConfig, MemoryConsumer, MemoryPublisher};
use waybill_outbox_core::{Headers, StopHandle};

use crate::{Consume, Harness};

/// A [`MemoryBroker`] and one topic. The broker (which holds the consumers' retry policy) is
/// made by the first [`consumer`](Harness::consumer) call, as a real queue is declared by its
/// consumer before anything is published.
#[derive(Debug)]
pub struct MemoryHarness {
    broker: Option<MemoryBroker>,
    topic: String,
}

impl MemoryHarness {
    /// A harness for a fresh topic.
    pub fn new() -> Self {
        Self {
            broker: None,
            topic: crate::unique("orders"),
        }
    }

    fn broker(&self) -> &MemoryBroker {
        self.broker
            .as_ref()
            .expect("make the consumer first: its queue must exist before publishing")
    }
}

impl Default for MemoryHarness {
    fn default() -> Self {
        Self::new()
    }
}

impl Harness for MemoryHarness {
    type Publisher = MemoryPublisher;
    type Consumer = MemoryConsumer;

    fn name(&self) -> &'static str {
        "memory"
    }

    fn topic(&self) -> &str {
        &self.topic
    }

    fn publisher(&mut self) -> MemoryPublisher {
        self.broker().publisher()
    }

    fn consumer(&mut self, retry: RetryPolicy) -> MemoryConsumer {
        let broker = self
            .broker
            .get_or_insert_with(|| MemoryBroker::new(MemoryConfig::default().retry(retry)));
        broker.consumer(self.topic.clone())
    }

    fn publish_raw(&mut self, headers: Headers, payload: Vec<u8>) {
        self.broker().publish_raw(&self.topic, headers, payload);
    }

    fn dead_letters(&mut self) -> Vec<String> {
        self.broker
            .as_ref()
            .map(|b| b.dead_letters().into_iter().map(|d| d.reason).collect())
            .unwrap_or_default()
    }
}

impl Consume for MemoryConsumer {
    fn run_once<H: DeliveryHandler>(
        &mut self,
        handler: &mut H,
        max: usize,
        wait: std::time::Duration,
    ) -> Result<ConsumeReport, String> {
        Ok(MemoryConsumer::run_once(self, handler, max, wait))
    }

    fn run<H: DeliveryHandler>(
        &mut self,
        handler: &mut H,
        stop: &StopHandle,
    ) -> Result<ConsumeReport, String> {
        Ok(MemoryConsumer::run(self, handler, stop))
    }
}
