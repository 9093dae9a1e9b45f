-- The model's label the task carried when a person labeled it ('' = none, or stored before this
-- column), so an audit of an automatic label can be scored against the model in the report.
ALTER TABLE export.raw_labels ADD COLUMN model_label text NOT NULL DEFAULT '';
