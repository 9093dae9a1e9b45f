-- The scorer's view of every predicted item and of each project's model inputs.
CREATE TABLE scorer.projects (
    project_id text PRIMARY KEY,
    model_id text NOT NULL,
    label_embeddings bytea NOT NULL,     -- float32, row-major, one row per label
    n_labels integer NOT NULL,
    dim integer NOT NULL,
    refits integer NOT NULL DEFAULT 0,
    threshold real,
    estimated_accuracy real,
    updated_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE scorer.items (
    item_id uuid PRIMARY KEY,
    project_id text NOT NULL,
    external_id text NOT NULL,
    text text NOT NULL,
    synthetic boolean NOT NULL DEFAULT false,
    embedding bytea NOT NULL,            -- float32, L2-normalized
    zero_shot real[] NOT NULL,           -- the labeler's distribution
    state text NOT NULL,                 -- review | auto | human
    reason text NOT NULL,                -- why it went where it went
    predicted_label integer NOT NULL,    -- the model's label when decided
    confidence real NOT NULL,
    priority real NOT NULL DEFAULT 0,
    model_id text NOT NULL,
    human_label integer,
    annotator_id text,
    withdrawn boolean NOT NULL DEFAULT false,
    predicted_at timestamptz NOT NULL DEFAULT now(),
    decided_at timestamptz NOT NULL DEFAULT now(),
    labeled_at timestamptz
);
CREATE INDEX items_project_state ON scorer.items (project_id, state);
CREATE INDEX items_project_labeled ON scorer.items (project_id) WHERE human_label IS NOT NULL;

CREATE TABLE scorer.outbox (
    id bigserial PRIMARY KEY,
    subject text NOT NULL,
    msg_id text NOT NULL,
    payload bytea NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
