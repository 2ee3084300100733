DROP TABLE IF EXISTS inbox_sequence_gaps;
DROP TABLE IF EXISTS inbox_sequence_marks;
DROP TABLE IF EXISTS outbox_sequence_epoch;
DROP TABLE IF EXISTS outbox_key_sequences;
