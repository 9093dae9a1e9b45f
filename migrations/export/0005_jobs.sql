-- Exports become jobs: created at once in state 'building', filled page by page in the
-- background (rows_done of rows_total), then 'ready' with the checksum of their canonical JSONL,
-- or 'failed' with the error. Snapshots made before this were complete when created: ready.
ALTER TABLE export.exports
    ADD COLUMN state text NOT NULL DEFAULT 'ready' CHECK (state IN ('building', 'ready', 'failed')),
    ADD COLUMN version bigint,
    ADD COLUMN rows_total bigint NOT NULL DEFAULT 0,
    ADD COLUMN rows_done bigint NOT NULL DEFAULT 0,
    ADD COLUMN checksum text NOT NULL DEFAULT '',       -- '' for snapshots made before jobs
    ADD COLUMN error text NOT NULL DEFAULT '',
    ADD COLUMN filter jsonb NOT NULL DEFAULT '{}',
    ADD COLUMN expires_at timestamptz,                  -- NULL: kept until the retention says
    ADD COLUMN ready_at timestamptz;

UPDATE export.exports e
SET version = v.n, rows_total = e.rows, rows_done = e.rows, ready_at = e.created_at
FROM (
    SELECT export_id, row_number() OVER (PARTITION BY project_id ORDER BY created_at, export_id) AS n
    FROM export.exports
) v
WHERE v.export_id = e.export_id;
ALTER TABLE export.exports ALTER COLUMN version SET NOT NULL;
CREATE UNIQUE INDEX exports_project_version ON export.exports (project_id, version);

-- The last version handed out per project. A counter rather than max(version) + 1: the sweeper
-- deletes old snapshots, and a version number must never be handed out twice. Its row lock also
-- orders concurrent creations of one project.
CREATE TABLE export.export_versions (
    project_id text PRIMARY KEY,
    last bigint NOT NULL
);
INSERT INTO export.export_versions (project_id, last)
SELECT project_id, max(version) FROM export.exports GROUP BY project_id;
