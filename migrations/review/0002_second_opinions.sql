-- A second opinion is a second task on the same item (round 1), answered by someone else.
ALTER TABLE review.tasks ADD COLUMN round integer NOT NULL DEFAULT 0;
ALTER TABLE review.tasks DROP CONSTRAINT tasks_item_id_key;
ALTER TABLE review.tasks ADD CONSTRAINT tasks_item_round_key UNIQUE (item_id, round);
