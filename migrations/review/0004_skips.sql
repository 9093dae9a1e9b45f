-- Who skipped what: a person is not handed a task they skipped again (others are).
CREATE TABLE review.skips (
    task_id uuid NOT NULL REFERENCES review.tasks ON DELETE CASCADE,
    annotator_id text NOT NULL,
    reason text NOT NULL DEFAULT '',
    skipped_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (task_id, annotator_id)
);
