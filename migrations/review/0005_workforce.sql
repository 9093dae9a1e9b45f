-- Workforces: pools and the people in them, routing by pool, skills and capacity, overlap (several
-- people per item), the aggregated label, gold questions, and each person's standing per project.
CREATE TABLE review.pools (
    pool_id text PRIMARY KEY,
    name text NOT NULL DEFAULT '',
    max_leased integer NOT NULL DEFAULT 0,          -- leased tasks across the pool (0 = no limit)
    vendor_user_id text NOT NULL DEFAULT '',        -- the vendor account that works for the pool
    updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX pools_vendor ON review.pools (vendor_user_id) WHERE vendor_user_id <> '';

-- A row per person who ever asked for work; claims lock it, which keeps one person's capacity exact.
CREATE TABLE review.annotators (
    annotator_id text PRIMARY KEY,
    pool_id text NOT NULL DEFAULT '',
    skills text[] NOT NULL DEFAULT '{}',
    max_leased integer NOT NULL DEFAULT 0,          -- 0 = the service default
    created_at timestamptz NOT NULL DEFAULT now()
);

-- A person on a project: tasks served (the gold schedule), gold answers, pause.
CREATE TABLE review.standing (
    project_id text NOT NULL,
    annotator_id text NOT NULL,
    served integer NOT NULL DEFAULT 0,
    gold_served integer NOT NULL DEFAULT 0,
    gold_answered integer NOT NULL DEFAULT 0,
    gold_correct integer NOT NULL DEFAULT 0,
    paused boolean NOT NULL DEFAULT false,
    paused_reason text NOT NULL DEFAULT '',
    paused_at timestamptz,
    PRIMARY KEY (project_id, annotator_id)
);

-- Overlap: an item that needs k people has k tasks in its round (slots 0..k-1), each leased alone.
ALTER TABLE review.tasks ADD COLUMN slot integer NOT NULL DEFAULT 0;
ALTER TABLE review.tasks DROP CONSTRAINT tasks_item_round_key;
ALTER TABLE review.tasks ADD CONSTRAINT tasks_item_round_slot_key UNIQUE (item_id, round, slot);
-- Routing: the pool a task waits for ('' = anyone allowed), the skills it needs, the pool of its lease.
ALTER TABLE review.tasks ADD COLUMN pool_id text NOT NULL DEFAULT '';
ALTER TABLE review.tasks ADD COLUMN skills text[] NOT NULL DEFAULT '{}';
ALTER TABLE review.tasks ADD COLUMN lease_pool text;
ALTER TABLE review.annotations ADD COLUMN pool_id text NOT NULL DEFAULT '';

DROP INDEX review.tasks_queue;
CREATE INDEX tasks_queue ON review.tasks (project_id, pool_id, priority DESC, created_at) WHERE state = 'open';
-- Tasks past the project's SLA are served oldest first, whatever their pool.
CREATE INDEX tasks_waiting ON review.tasks (project_id, created_at) WHERE state = 'open';
CREATE INDEX tasks_lease_owner ON review.tasks (lease_owner) WHERE state = 'leased';
CREATE INDEX tasks_lease_pool ON review.tasks (lease_pool) WHERE state = 'leased';

-- The skills an item's review needs, from its metadata; it may arrive before or after its task.
CREATE TABLE review.item_skills (
    item_id uuid PRIMARY KEY,
    project_id text NOT NULL,
    skills text[] NOT NULL
);

-- The aggregated label of an item several people labeled.
CREATE TABLE review.consensus (
    item_id uuid PRIMARY KEY,
    project_id text NOT NULL,
    label text NOT NULL,
    posterior real NOT NULL,
    method text NOT NULL,
    annotators text[] NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX consensus_project ON review.consensus (project_id);

CREATE TABLE review.gold (
    gold_id uuid PRIMARY KEY,
    project_id text NOT NULL,
    external_id text NOT NULL,
    text text NOT NULL,
    answer text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (project_id, external_id)
);

-- A gold question put to one person (once: a person never sees the same gold twice).
CREATE TABLE review.gold_tasks (
    task_id uuid PRIMARY KEY,
    gold_id uuid NOT NULL REFERENCES review.gold ON DELETE CASCADE,
    project_id text NOT NULL,
    annotator_id text NOT NULL,
    pool_id text NOT NULL DEFAULT '',
    state text NOT NULL DEFAULT 'leased',           -- leased | done
    lease_id uuid,
    lease_expires_at timestamptz,
    label text NOT NULL DEFAULT '',
    correct boolean,
    seconds_spent real NOT NULL DEFAULT 0,
    created_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (gold_id, annotator_id)
);
CREATE INDEX gold_tasks_leased ON review.gold_tasks (annotator_id) WHERE state = 'leased';
CREATE INDEX gold_tasks_project ON review.gold_tasks (project_id, annotator_id);
