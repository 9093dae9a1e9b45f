-- Item metadata (slice fields such as domain, region), and the slices a quality report flagged:
-- items of a flagged slice are audited more often, so the guarantee holds there too.
ALTER TABLE scorer.items ADD COLUMN metadata jsonb NOT NULL DEFAULT '{}';
CREATE TABLE scorer.slice_flags (
    project_id text NOT NULL,
    field text NOT NULL,
    value text NOT NULL,
    reasons text[] NOT NULL,
    flagged_at timestamptz NOT NULL DEFAULT now(),
    reported_at timestamptz NOT NULL,
    PRIMARY KEY (project_id, field, value)
);
