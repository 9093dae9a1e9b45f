"""The web app's Prometheus metrics (exported on the service's ops port, /metrics).

Labels are route patterns (`/projects/{project_id}`), never concrete paths or user ids."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

REQUESTS = Counter(
    "tandem_web_requests_total",
    "HTTP requests answered, by route pattern, method and status.",
    ["route", "method", "status"],
)
REQUEST_SECONDS = Histogram(
    "tandem_web_request_seconds",
    "Time to answer one HTTP request, by route pattern.",
    ["route"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10),
)
LABELS = Counter("tandem_web_labels_total", "Labels people submitted through the app.")
UPLOADED = Counter(
    "tandem_web_uploaded_items_total", "Items uploaded through the app, by outcome.", ["outcome"]
)
