-- In a project whose people label blind, the model's label each person's label was checked
-- against (fixed before the model learned that label); NULL where the label was not checked.
ALTER TABLE scorer.items ADD COLUMN checked_label smallint;
