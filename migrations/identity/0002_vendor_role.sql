-- The vendor role: a vendor's system that claims and submits for its pool's workers.
ALTER TABLE identity.users DROP CONSTRAINT users_role_check;
ALTER TABLE identity.users ADD CONSTRAINT users_role_check
    CHECK (role IN ('admin', 'manager', 'reviewer', 'annotator', 'viewer', 'vendor'));
