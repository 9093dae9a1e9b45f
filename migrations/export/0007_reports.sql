-- Quality reports publish the slices they flag (tandem.quality.v1.slices_flagged) through an
-- outbox, and keep them: a report says since when the scorer audits a slice more.
CREATE TABLE export.outbox (
    id bigserial PRIMARY KEY,
    subject text NOT NULL,
    msg_id text NOT NULL,
    payload bytea NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE export.slice_flags (
    project_id text NOT NULL,
    field text NOT NULL,
    value text NOT NULL,
    reasons text[] NOT NULL,
    flagged_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (project_id, field, value)
);
