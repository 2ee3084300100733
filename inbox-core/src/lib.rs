//! Backend-free types of the waybill inbox (see issue 4).
