-- An aggregated human label (several people) trains the model with its posterior as weight.
ALTER TABLE scorer.items ADD COLUMN human_weight real NOT NULL DEFAULT 1;
