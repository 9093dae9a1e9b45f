-- Users, project memberships and API tokens. The source of truth; the `tandem_identity` NATS
-- bucket holds the view every service checks calls against (republished at every start).
CREATE TABLE identity.users (
    user_id text PRIMARY KEY,
    role text NOT NULL CHECK (role IN ('admin', 'manager', 'reviewer', 'annotator', 'viewer')),
    display_name text NOT NULL DEFAULT '',
    password_hash text,                 -- argon2id; NULL = tokens only
    disabled boolean NOT NULL DEFAULT false,
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE identity.memberships (
    project_id text NOT NULL,
    user_id text NOT NULL REFERENCES identity.users ON DELETE CASCADE,
    added_by text NOT NULL,
    added_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (project_id, user_id)
);
CREATE INDEX memberships_user ON identity.memberships (user_id);

CREATE TABLE identity.tokens (
    token_id uuid PRIMARY KEY,
    user_id text NOT NULL REFERENCES identity.users ON DELETE CASCADE,
    digest text NOT NULL UNIQUE,        -- sha256 of the token; the token itself is never stored
    name text NOT NULL DEFAULT '',
    session boolean NOT NULL DEFAULT false,
    created_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL,
    revoked_at timestamptz
);
CREATE INDEX tokens_user ON identity.tokens (user_id);
