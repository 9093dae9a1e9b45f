"""The reasons a quality report flags a slice, as they travel on tandem.quality.v1.slices_flagged,
and which of them the scorer acts on. Shared: the export service writes them, the scorer reads them.
"""

from __future__ import annotations

ACCURACY_BELOW_TARGET = "accuracy_below_target"
DISTRIBUTION_DRIFT = "distribution_drift"
# The flag whose slices are audited more. A label distribution that drifts from the whole may be
# the nature of the slice (a domain has its own intents), not an error: more audits measure
# accuracy, so they follow the accuracy flag.
AUDITED_MORE = ACCURACY_BELOW_TARGET
