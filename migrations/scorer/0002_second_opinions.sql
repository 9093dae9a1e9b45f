-- Confident-learning audit of human labels: second opinions and their outcome.
ALTER TABLE scorer.items ADD COLUMN second_opinion_requested boolean NOT NULL DEFAULT false;
ALTER TABLE scorer.items ADD COLUMN second_label integer;
ALTER TABLE scorer.items ADD COLUMN first_label integer;
ALTER TABLE scorer.items ADD COLUMN suspected_label integer;
