"""The scorer's active-learning policy, pure domain code (no I/O), in one package:

- features: model input rows from what the scorer stores per item;
- centroids, model: the project's classifier (centroids first, then a prior logistic regression);
- neighbours: the labels of an item's nearest labeled items, a second view mixed into the regression's;
- routing: people's order (random warm-up, then ambiguous-first);
- proposals: which items are proposed for automatic acceptance, audited, accepted or handed back;
- certification: the anytime-valid certificate every acceptance rests on;
- labels_audit: confident learning on human labels;
- budget: the human budget.

The scorer (services/scorer/service.py, handlers.py) and the offline harness (loadtests/) drive it
through services.scorer.service.ProjectModel.
"""
