-- The model's confidence in the label the task carried (0 = none): a label-error check lists the
-- person's label beside the model's and how sure the model was.
ALTER TABLE export.raw_labels ADD COLUMN model_confidence real NOT NULL DEFAULT 0;
