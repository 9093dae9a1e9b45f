-- Projects and items; owned by the ingest service.
CREATE TABLE ingest.projects (
    project_id text PRIMARY KEY,
    spec bytea NOT NULL,                 -- tandem.projects.v1.Project
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE ingest.items (
    item_id uuid PRIMARY KEY,
    project_id text NOT NULL REFERENCES ingest.projects (project_id),
    external_id text NOT NULL,
    content_hash text NOT NULL,
    text text NOT NULL,
    metadata jsonb NOT NULL DEFAULT '{}',
    synthetic boolean NOT NULL DEFAULT false,
    ingested_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (project_id, content_hash)
);

-- Rejected input is kept (truncated) so nothing a client sent is lost without a trace.
CREATE TABLE ingest.rejections (
    id bigserial PRIMARY KEY,
    project_id text NOT NULL,
    external_id text NOT NULL,
    reason text NOT NULL,
    raw bytea NOT NULL,
    rejected_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX rejections_project ON ingest.rejections (project_id);

CREATE TABLE ingest.project_counters (
    project_id text PRIMARY KEY,
    duplicates bigint NOT NULL DEFAULT 0,
    rejected bigint NOT NULL DEFAULT 0
);

CREATE TABLE ingest.outbox (
    id bigserial PRIMARY KEY,
    subject text NOT NULL,
    msg_id text NOT NULL,
    payload bytea NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
