-- Every person's own label (with overlap, several per item), so an export shows who said what
-- next to the aggregated label. One row per person and task: a redelivered message adds nothing.
CREATE TABLE export.raw_labels (
    item_id uuid NOT NULL,
    project_id text NOT NULL,
    task_id text NOT NULL,
    annotator_id text NOT NULL,
    pool_id text NOT NULL DEFAULT '',   -- the annotator's pool ('' = none)
    label text NOT NULL,
    reason text NOT NULL DEFAULT '',    -- why the item went to people
    seconds_spent double precision NOT NULL DEFAULT 0,
    labeled_at timestamptz NOT NULL,
    PRIMARY KEY (item_id, task_id, annotator_id)
);
-- The snapshot reads an item's raw labels in time order; with labeled_at in the index that read
-- is an index range scan already in order, whatever the table's size.
CREATE INDEX raw_labels_item ON export.raw_labels (item_id, labeled_at);

-- How the final label was aggregated: single | majority_vote | dawid_skene ('' before overlap).
ALTER TABLE export.final_labels ADD COLUMN method text NOT NULL DEFAULT '';
