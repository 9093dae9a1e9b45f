-- Review tasks (one per item for now) and the annotations people gave.
CREATE TABLE review.tasks (
    task_id uuid PRIMARY KEY,
    item_id uuid NOT NULL UNIQUE,
    project_id text NOT NULL,
    external_id text NOT NULL,
    text text NOT NULL,
    suggested_label text NOT NULL DEFAULT '',
    confidence real NOT NULL DEFAULT 0,
    reason text NOT NULL DEFAULT '',
    priority double precision NOT NULL DEFAULT 0,
    synthetic boolean NOT NULL DEFAULT false,
    state text NOT NULL DEFAULT 'open',  -- open | leased | done | withdrawn
    lease_id uuid,
    lease_owner text,
    lease_expires_at timestamptz,
    skips integer NOT NULL DEFAULT 0,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);
-- The queue: NextTask reads the head of this index with FOR UPDATE SKIP LOCKED.
CREATE INDEX tasks_queue ON review.tasks (project_id, priority DESC, created_at) WHERE state = 'open';
CREATE INDEX tasks_leased ON review.tasks (lease_expires_at) WHERE state = 'leased';
CREATE INDEX tasks_project_state ON review.tasks (project_id, state);

CREATE TABLE review.annotations (
    task_id uuid NOT NULL REFERENCES review.tasks (task_id),
    annotator_id text NOT NULL,
    label text NOT NULL,
    seconds_spent real NOT NULL DEFAULT 0,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (task_id, annotator_id)
);

CREATE TABLE review.outbox (
    id bigserial PRIMARY KEY,
    subject text NOT NULL,
    msg_id text NOT NULL,
    payload bytea NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
