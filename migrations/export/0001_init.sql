-- Item copies and final labels, materialized from the bus, and the export snapshots.
CREATE TABLE export.items (
    item_id uuid PRIMARY KEY,
    project_id text NOT NULL,
    external_id text NOT NULL,
    text text NOT NULL,
    metadata jsonb NOT NULL DEFAULT '{}',
    synthetic boolean NOT NULL DEFAULT false,
    ingested_at timestamptz NOT NULL
);
CREATE INDEX items_project ON export.items (project_id);

CREATE TABLE export.final_labels (
    item_id uuid PRIMARY KEY,
    project_id text NOT NULL,
    label text NOT NULL,
    source text NOT NULL,               -- auto | human | consensus | gold
    source_rank smallint NOT NULL,      -- a later label replaces an earlier one only if not weaker
    confidence real NOT NULL,
    model_version text NOT NULL DEFAULT '',
    annotator_ids text[] NOT NULL DEFAULT '{}',
    finalized_at timestamptz NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX final_labels_project ON export.final_labels (project_id);

CREATE TABLE export.exports (
    export_id uuid PRIMARY KEY,
    project_id text NOT NULL,
    rows bigint NOT NULL,
    pending bigint NOT NULL,
    rows_by_source jsonb NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);

-- A snapshot is a copy of the rows at creation time, so a stream is stable while labels change.
CREATE TABLE export.export_rows (
    export_id uuid NOT NULL REFERENCES export.exports (export_id) ON DELETE CASCADE,
    item_id uuid NOT NULL,
    line jsonb NOT NULL,
    PRIMARY KEY (export_id, item_id)
);
