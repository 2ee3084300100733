//! In-process broker for waybill: the embedded default and tests, with fault injection.
