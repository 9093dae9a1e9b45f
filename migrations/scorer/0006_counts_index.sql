-- The project's counts (stats, `tandem status`, dashboards) from an index-only scan: the items'
-- heap carries each embedding, so counting a million items by scanning it took seconds.
-- Supersedes items_project_state (same key).
CREATE INDEX items_project_counts ON scorer.items (project_id, state)
    INCLUDE (reason, withdrawn, human_label, predicted_label, second_opinion_requested,
             second_label, first_label, suspected_label);
DROP INDEX scorer.items_project_state;
