-- The format an export is streamed in, fixed at creation, and the split (if any) of its rows:
-- the split is assigned once, when the snapshot is taken, and written into each row's line.
ALTER TABLE export.exports ADD COLUMN format text NOT NULL DEFAULT 'jsonl';
ALTER TABLE export.exports ADD COLUMN rows_by_split jsonb NOT NULL DEFAULT '{}';
