-- What the labeler said about each item: its model id, prompt hash and distribution over the
-- project's labels ({"model_id", "prompt_hash", "distribution": {label: probability}}), exported
-- with the item. A table of its own: predictions and items arrive on different subjects, in
-- either order.
CREATE TABLE export.predictions (
    item_id uuid PRIMARY KEY,
    project_id text NOT NULL,
    labeler jsonb NOT NULL,
    predicted_at timestamptz NOT NULL
);
