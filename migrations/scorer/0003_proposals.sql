-- Proposals for automatic acceptance and their audits (services/scorer/policy/proposals.py). An
-- item handed back to people may be proposed again later, with a fresh draw: one row per proposal.
CREATE TABLE scorer.proposals (
    project_id text NOT NULL,
    batch integer NOT NULL,              -- proposal batch number within the project
    item_id uuid NOT NULL,
    label integer NOT NULL,              -- the label the certificate vouches for
    confidence real NOT NULL,
    audit_prob real NOT NULL,            -- probability of an audit, fixed before the draw
    audited boolean NOT NULL,
    state text NOT NULL DEFAULT 'pending',  -- pending | accepted | rejected (the batch's fate)
    PRIMARY KEY (item_id, batch)
);
CREATE INDEX proposals_project_batch ON scorer.proposals (project_id, batch);
ALTER TABLE scorer.projects ADD COLUMN certified_accuracy real;
