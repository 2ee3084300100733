//! How an outbox message's topic and partition key become a NATS subject.

use std::fmt;
use std::sync::Arc;

/// A function from `(topic, partition_key)` to a subject, for [`SubjectMapping::Custom`].
pub type SubjectFn = dyn Fn(&str, &str) -> String + Send + Sync;

/// Chooses the subject each outbox message is published to.
///
/// - [`SubjectMapping::Topic`] (the default): the subject is the topic, e.g. `orders`.
/// - [`SubjectMapping::TopicAndKey`]: `<topic>.<sanitized key>`, e.g. `orders.order:4231`, so
///   a consumer can filter on one key (`orders.order:4231`) or all (`orders.*`).
/// - [`SubjectMapping::Custom`]: any function of the message's topic and key.
///
/// Sanitizing a key for a subject token ([`sanitize_token`]): NATS splits subjects at `.` and
/// gives `*` and `>` a wildcard meaning, and no subject may contain whitespace, so each of
/// `.`, `*`, `>`, whitespace and control characters becomes `_`; an empty key becomes `_`.
/// Sanitizing can map two keys to one subject (`a.b` and `a_b`): that only merges their
/// subjects, never their order or identity, which travel in the `waybill-*` headers.
///
/// ```
/// use waybill_nats::SubjectMapping;
///
/// assert_eq!(SubjectMapping::Topic.subject("orders", "order:1"), "orders");
/// assert_eq!(SubjectMapping::TopicAndKey.subject("orders", "eu.order 1"), "orders.eu_order_1");
/// let custom = SubjectMapping::custom(|topic, _key| format!("app.{topic}"));
/// assert_eq!(custom.subject("orders", "k"), "app.orders");
/// ```
#[derive(Clone, Default)]
#[non_exhaustive]
pub enum SubjectMapping {
    /// The subject is the topic.
    #[default]
    Topic,
    /// The subject is `<topic>.<sanitized key>`.
    TopicAndKey,
    /// The subject is what the function returns for `(topic, partition_key)`.
    Custom(Arc<SubjectFn>),
}

impl fmt::Debug for SubjectMapping {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Topic => f.write_str("Topic"),
            Self::TopicAndKey => f.write_str("TopicAndKey"),
            Self::Custom(_) => f.write_str("Custom(..)"),
        }
    }
}

impl SubjectMapping {
    /// A mapping computed by `map(topic, partition_key)`.
    pub fn custom(map: impl Fn(&str, &str) -> String + Send + Sync + 'static) -> Self {
        Self::Custom(Arc::new(map))
    }

    /// The subject for a message with this topic and partition key.
    pub fn subject(&self, topic: &str, partition_key: &str) -> String {
        match self {
            Self::Topic => topic.to_owned(),
            Self::TopicAndKey => format!("{topic}.{}", sanitize_token(partition_key)),
            Self::Custom(map) => map(topic, partition_key),
        }
    }
}

/// `value` made into one subject token: `.`, `*`, `>`, whitespace and control characters
/// become `_`, and an empty value becomes `_`.
///
/// ```
/// assert_eq!(waybill_nats::sanitize_token("order:4231"), "order:4231");
/// assert_eq!(waybill_nats::sanitize_token("a.b*c>d e"), "a_b_c_d_e");
/// assert_eq!(waybill_nats::sanitize_token(""), "_");
/// ```
pub fn sanitize_token(value: &str) -> String {
    if value.is_empty() {
        return "_".to_owned();
    }
    value
        .chars()
        .map(|c| {
            if matches!(c, '.' | '*' | '>') || c.is_whitespace() || c.is_control() {
                '_'
            } else {
                c
            }
        })
        .collect()
}

/// Why `subject` can never be published to, if it cannot: empty, whitespace or control
/// characters, an empty token, or a wildcard token.
pub(crate) fn invalid_publish_subject(subject: &str) -> Option<&'static str> {
    if subject.is_empty() {
        return Some("the subject is empty");
    }
    // Per byte when ASCII: this runs for every message published.
    let unprintable = if subject.is_ascii() {
        subject.bytes().any(|b| !b.is_ascii_graphic())
    } else {
        subject.chars().any(|c| c.is_whitespace() || c.is_control())
    };
    if unprintable {
        return Some("the subject contains whitespace or control characters");
    }
    for token in subject.split('.') {
        if token.is_empty() {
            return Some("the subject has an empty token");
        }
        if token == "*" || token == ">" {
            return Some("the subject contains a wildcard");
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sanitized_keys_are_single_valid_tokens() {
        for key in ["", ".", "a.b", "*", ">", "a b\tc\n", "ключ", "order:1/2"] {
            let subject = SubjectMapping::TopicAndKey.subject("orders", key);
            assert_eq!(invalid_publish_subject(&subject), None, "{key:?}");
            assert_eq!(subject.split('.').count(), 2, "{key:?}");
        }
    }

    #[test]
    fn invalid_subjects_are_named() {
        for subject in ["", "a..b", ".a", "a.", "a.*", "a.>", "a b", "a\r\nb"] {
            assert!(invalid_publish_subject(subject).is_some(), "{subject:?}");
        }
        assert_eq!(invalid_publish_subject("orders.eu.1"), None);
    }
}
