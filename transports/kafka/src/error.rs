//! The transport's error type.

use std::time::Duration;

use rdkafka::error::{KafkaError, RDKafkaErrorCode};

/// What can go wrong while talking to Kafka.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// librdkafka refused the configuration or could not create its client (a misspelt
    /// property, a value out of range).
    #[error("creating the Kafka {what} for {brokers} failed")]
    Client {
        /// `"producer"`, `"consumer"` or `"admin client"`.
        what: &'static str,
        /// The bootstrap servers, passwords redacted.
        brokers: String,
        /// librdkafka's error.
        #[source]
        source: Box<KafkaError>,
    },
    /// No broker of the cluster answered a metadata request in time: the cluster is down or
    /// unreachable.
    #[error("no Kafka broker of {brokers} answered within {timeout:?}")]
    Unreachable {
        /// The bootstrap servers, passwords redacted.
        brokers: String,
        /// How long it waited.
        timeout: Duration,
        /// librdkafka's error.
        #[source]
        source: Box<KafkaError>,
    },
    /// Creating a topic failed (other than because it exists).
    #[error("creating topic {topic} failed")]
    CreateTopic {
        /// The topic.
        topic: String,
        /// librdkafka's error.
        #[source]
        source: Box<KafkaError>,
    },
    /// Subscribing the consumer to its topic failed.
    #[error("subscribing to topic {topic} failed")]
    Subscribe {
        /// The topic.
        topic: String,
        /// librdkafka's error.
        #[source]
        source: Box<KafkaError>,
    },
    /// Fetching the next record failed (a lost connection, a rebalance error); librdkafka
    /// reconnects by itself.
    #[error("consuming topic {topic} failed")]
    Consume {
        /// The topic.
        topic: String,
        /// librdkafka's error.
        #[source]
        source: Box<KafkaError>,
    },
    /// Committing the offset after a handled record failed (the partition was revoked, the
    /// coordinator is unreachable). The record is delivered again unless a later offset of its
    /// partition is committed first.
    #[error("committing offset {offset} of {topic}/{partition} failed")]
    Commit {
        /// The topic.
        topic: String,
        /// The partition.
        partition: i32,
        /// The offset committed (the handled record's offset + 1).
        offset: i64,
        /// librdkafka's error.
        #[source]
        source: Box<KafkaError>,
    },
    /// Seeking a partition back to a record that must be consumed again failed; the record
    /// comes back after the next rebalance.
    #[error("seeking {topic}/{partition} back to offset {offset} failed")]
    Seek {
        /// The topic.
        topic: String,
        /// The partition.
        partition: i32,
        /// The record's offset.
        offset: i64,
        /// librdkafka's error.
        #[source]
        source: Box<KafkaError>,
    },
    /// The dead-letter topic did not take a copy of a record (missing, refused, no answer in
    /// time). The original was handed back to be consumed again.
    #[error("dead-lettering {topic}/{partition}@{offset} to {dead_letter_topic} failed")]
    DeadLetter {
        /// The original record's topic.
        topic: String,
        /// The original record's partition.
        partition: i32,
        /// The original record's offset.
        offset: i64,
        /// Where it was to go.
        dead_letter_topic: String,
        /// librdkafka's error.
        #[source]
        source: Box<KafkaError>,
    },
    /// The producer's transactions could not be initialised (a broker without transactions, a
    /// coordinator that does not answer).
    #[error("initialising the transactions of transactional.id {transactional_id} failed")]
    Transactions {
        /// The producer's `transactional.id`.
        transactional_id: String,
        /// librdkafka's error.
        #[source]
        source: Box<KafkaError>,
    },
}

/// A `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// `true` when trying again later may work: the cluster is unreachable, a connection was
    /// lost, a rebalance interfered, the dead-letter topic is missing for now. `false` for a
    /// configuration librdkafka refuses, failed authentication or authorization, and a fenced
    /// transactional producer.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Client { .. } => false,
            Self::Unreachable { .. } => true,
            Self::CreateTopic { source, .. }
            | Self::Subscribe { source, .. }
            | Self::Consume { source, .. }
            | Self::Commit { source, .. }
            | Self::Seek { source, .. }
            | Self::DeadLetter { source, .. }
            | Self::Transactions { source, .. } => kafka_error_is_retryable(source),
        }
    }
}

impl waybill_outbox_core::Retryable for Error {
    fn is_retryable(&self) -> bool {
        Error::is_retryable(self)
    }
}

/// `false` for what no retry fixes: configuration, authentication, authorization, a fenced
/// producer, librdkafka's fatal errors.
pub(crate) fn kafka_error_is_retryable(error: &KafkaError) -> bool {
    match error {
        KafkaError::ClientConfig(..) | KafkaError::ClientCreation(_) | KafkaError::Nul(_) => false,
        KafkaError::Transaction(error) => !error.is_fatal() && !is_refusal(error.code()),
        KafkaError::MessageConsumptionFatal(_) => false,
        other => other
            .rdkafka_error_code()
            .is_none_or(|code| !is_refusal(code)),
    }
}

/// Codes no retry fixes.
fn is_refusal(code: RDKafkaErrorCode) -> bool {
    matches!(
        code,
        RDKafkaErrorCode::Authentication
            | RDKafkaErrorCode::SaslAuthenticationFailed
            | RDKafkaErrorCode::TopicAuthorizationFailed
            | RDKafkaErrorCode::GroupAuthorizationFailed
            | RDKafkaErrorCode::ClusterAuthorizationFailed
            | RDKafkaErrorCode::TransactionalIdAuthorizationFailed
            | RDKafkaErrorCode::InvalidConfig
            | RDKafkaErrorCode::ProducerFenced
            | RDKafkaErrorCode::Fenced
            | RDKafkaErrorCode::Fatal
            | RDKafkaErrorCode::InvalidArgument
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_are_final_and_outages_are_not() {
        let down = KafkaError::MessageConsumption(RDKafkaErrorCode::AllBrokersDown);
        assert!(kafka_error_is_retryable(&down));
        let denied = KafkaError::MessageConsumption(RDKafkaErrorCode::TopicAuthorizationFailed);
        assert!(!kafka_error_is_retryable(&denied));
        assert!(!kafka_error_is_retryable(&KafkaError::ClientCreation(
            "bad".into()
        )));
        let fenced = Error::Transactions {
            transactional_id: "relay-1".into(),
            source: Box::new(KafkaError::MessageProduction(
                RDKafkaErrorCode::ProducerFenced,
            )),
        };
        assert!(!fenced.is_retryable());
    }
}
