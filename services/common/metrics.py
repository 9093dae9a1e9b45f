"""Metrics shared by every service. Labels never carry item, annotator or project ids."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

BUS_MESSAGES = Counter(
    "tandem_bus_messages_total",
    "Bus messages handled, by consumer and outcome (ack, nak, dead_letter, fatal).",
    ["consumer", "outcome"],
)
BUS_HANDLER_SECONDS = Histogram(
    "tandem_bus_handler_seconds",
    "Time spent handling one bus message.",
    ["consumer"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
BUS_BATCH_ITEMS = Histogram(
    "tandem_bus_batch_items",
    "Items carried by one bus message.",
    ["consumer"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
)
BUS_DEAD_LETTERS = Counter(
    "tandem_bus_dead_letters_total", "Messages sent to the dead-letter subject.", ["consumer"]
)
OUTBOX_PUBLISHED = Counter(
    "tandem_outbox_published_total", "Messages published from the transactional outbox.", ["subject"]
)
