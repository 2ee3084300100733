//! Conversions between waybill's string headers and AMQP field tables and short strings.

use std::collections::BTreeMap;

use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use waybill_inbox_core::wire::WireValue;
use waybill_outbox_core::Headers;

use crate::{Error, Result};

/// Prefix of the headers this transport adds for itself; stripped before decoding.
pub(crate) const TRANSPORT_PREFIX: &str = "x-waybill-";

/// A short string, or [`Error::TooLong`] naming `what`.
pub(crate) fn short(what: &'static str, value: impl Into<String>) -> Result<ShortString> {
    ShortString::try_new(value).map_err(|source| Error::TooLong { what, source })
}

/// The wire headers as a field table of long strings.
pub(crate) fn to_table(headers: &Headers) -> Result<FieldTable> {
    let mut table = FieldTable::default();
    for (name, value) in headers {
        table.insert(
            short("header name", name.as_str())?,
            AMQPValue::LongString(LongString::from(value.as_bytes())),
        );
    }
    Ok(table)
}

/// The typed headers of a delivery, for [`waybill_inbox_core::wire::Decoder`], without this
/// transport's own `x-waybill-*` headers. Long strings are text when UTF-8, else bytes; the
/// decoder passes text, numbers and booleans on to the handler and leaves out byte arrays,
/// tables and arrays (e.g. RabbitMQ's `x-death`).
pub(crate) fn from_table(table: Option<&FieldTable>) -> BTreeMap<String, WireValue> {
    let mut headers = BTreeMap::new();
    let Some(table) = table else {
        return headers;
    };
    for (name, value) in table {
        if name.as_str().starts_with(TRANSPORT_PREFIX) {
            continue;
        }
        headers.insert(name.to_string(), typed(value));
    }
    headers
}

/// An AMQP field value as a [`WireValue`].
pub(crate) fn typed(value: &AMQPValue) -> WireValue {
    match value {
        AMQPValue::LongString(s) => WireValue::from_bytes(s.as_bytes()),
        AMQPValue::ShortString(s) => WireValue::Text(s.as_str().to_owned()),
        AMQPValue::ByteArray(bytes) => WireValue::Bytes(bytes.as_slice().to_vec()),
        AMQPValue::Boolean(b) => WireValue::Bool(*b),
        AMQPValue::ShortShortInt(n) => WireValue::Integer(i64::from(*n)),
        AMQPValue::ShortShortUInt(n) => WireValue::Integer(i64::from(*n)),
        AMQPValue::ShortInt(n) => WireValue::Integer(i64::from(*n)),
        AMQPValue::ShortUInt(n) => WireValue::Integer(i64::from(*n)),
        AMQPValue::LongInt(n) => WireValue::Integer(i64::from(*n)),
        AMQPValue::LongUInt(n) => WireValue::Integer(i64::from(*n)),
        AMQPValue::LongLongInt(n) => WireValue::Integer(*n),
        AMQPValue::Float(n) => WireValue::Float(f64::from(*n)),
        AMQPValue::Double(n) => WireValue::Float(*n),
        AMQPValue::Timestamp(n) => WireValue::Timestamp(*n),
        AMQPValue::DecimalValue(_) => WireValue::Other("a decimal"),
        AMQPValue::FieldArray(_) => WireValue::Other("an array"),
        AMQPValue::FieldTable(_) => WireValue::Other("a table"),
        AMQPValue::Void => WireValue::Other("void"),
    }
}

/// A scalar header value as text; `None` for tables, arrays, byte arrays and void.
pub(crate) fn scalar_text(value: &AMQPValue) -> Option<String> {
    Some(match value {
        AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        AMQPValue::ShortString(s) => s.as_str().to_owned(),
        AMQPValue::Boolean(b) => b.to_string(),
        AMQPValue::ShortShortInt(n) => n.to_string(),
        AMQPValue::ShortShortUInt(n) => n.to_string(),
        AMQPValue::ShortInt(n) => n.to_string(),
        AMQPValue::ShortUInt(n) => n.to_string(),
        AMQPValue::LongInt(n) => n.to_string(),
        AMQPValue::LongUInt(n) => n.to_string(),
        AMQPValue::LongLongInt(n) => n.to_string(),
        AMQPValue::Timestamp(n) => n.to_string(),
        AMQPValue::Float(n) => n.to_string(),
        AMQPValue::Double(n) => n.to_string(),
        _ => return None,
    })
}

/// A header that holds a count, whatever integer or string type the sender used.
pub(crate) fn count(table: Option<&FieldTable>, name: &str) -> u32 {
    table
        .and_then(|t| t.inner().get(name))
        .and_then(scalar_text)
        .and_then(|text| text.trim().parse().ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_round_trip_through_a_field_table() -> Result<()> {
        let mut headers = Headers::new();
        headers.insert("traceparent".into(), "00-abc-01".into());
        headers.insert("ünïcode".into(), "välue".into());
        let mut table = to_table(&headers)?;
        table.insert("x-waybill-redeliveries".into(), AMQPValue::LongLongInt(3));
        table.insert("x-death".into(), AMQPValue::FieldArray(Default::default()));
        table.insert("n".into(), AMQPValue::ShortInt(-4));
        assert_eq!(count(Some(&table), "x-waybill-redeliveries"), 3);
        assert_eq!(count(Some(&table), "missing"), 0);
        table.insert("bytes".into(), AMQPValue::ByteArray(vec![1, 2].into()));
        let back = from_table(Some(&table));
        assert_eq!(back["n"], WireValue::Integer(-4));
        assert_eq!(back["bytes"], WireValue::Bytes(vec![1, 2]));
        assert_eq!(back["x-death"], WireValue::Other("an array"));
        assert!(!back.contains_key("x-waybill-redeliveries"));
        for (name, value) in &headers {
            assert_eq!(back[name], WireValue::Text(value.clone()));
        }
        Ok(())
    }

    #[test]
    fn long_header_names_are_errors_not_panics() {
        let mut headers = Headers::new();
        headers.insert("h".repeat(256), String::new());
        assert!(matches!(to_table(&headers), Err(Error::TooLong { .. })));
    }
}
