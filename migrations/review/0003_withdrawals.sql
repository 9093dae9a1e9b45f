-- A withdrawal sticks whatever order things happen in.
-- A leased task that is withdrawn finishes normally, but if its lease ends unanswered (skipped or
-- expired) it becomes 'withdrawn' instead of going back to the queue.
ALTER TABLE review.tasks ADD COLUMN withdraw_requested boolean NOT NULL DEFAULT false;

-- Every withdrawal, by item, so one that arrives before its task still applies to it.
CREATE TABLE review.withdrawals (
    item_id uuid PRIMARY KEY,
    project_id text NOT NULL DEFAULT '',
    created_at timestamptz NOT NULL DEFAULT now()
);
INSERT INTO review.withdrawals (item_id, project_id)
SELECT DISTINCT item_id, project_id FROM review.tasks WHERE state = 'withdrawn'
ON CONFLICT DO NOTHING;
