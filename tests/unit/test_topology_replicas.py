"""TANDEM_NATS_STREAM_REPLICAS reaches every stream and key-value bucket the topology declares."""

from __future__ import annotations

from typing import Any

import pytest
from nats.js import JetStreamContext
from nats.js.api import StreamConfig
from nats.js.errors import BadRequestError, NotFoundError

from services.common.bus import topology
from services.common.bus.topology import BUCKETS, CONSUMERS, STREAMS, apply_topology
from services.common.settings import CommonSettings


class FakeJetStream:
    """Records what apply_topology asks of JetStream; `existing` streams are updated, not added."""

    def __init__(
        self, existing: frozenset[str] = frozenset(), buckets_elsewhere: dict[str, int] | None = None
    ) -> None:
        self.existing = existing
        # Buckets made earlier with another replica count: creating them again is refused.
        self.buckets_elsewhere = buckets_elsewhere or {}
        self.added: list[StreamConfig] = []
        self.updated: list[StreamConfig] = []
        self.consumers: list[str] = []
        self.buckets: dict[str, int] = {}

    async def stream_info(self, name: str) -> Any:
        if name.startswith("KV_") and name[3:] in self.buckets_elsewhere:
            config = StreamConfig(
                name=name, num_replicas=self.buckets_elsewhere[name[3:]], max_msgs_per_subject=1
            )
            return type("Info", (), {"config": config})()
        if name not in self.existing:
            raise NotFoundError(code=404, err_code=10059, description="stream not found")
        return object()

    async def add_stream(self, config: StreamConfig) -> None:
        self.added.append(config)

    async def update_stream(self, config: StreamConfig) -> None:
        self.updated.append(config)

    async def add_consumer(self, stream: str, config: Any) -> None:
        self.consumers.append(config.durable_name)

    async def create_key_value(self, *, bucket: str, history: int, replicas: int) -> None:
        if self.buckets_elsewhere.get(bucket, replicas) != replicas:
            raise BadRequestError(
                code=400,
                err_code=10058,
                description="stream name already in use with a different configuration",
            )
        self.buckets[bucket] = replicas


def _js(fake: FakeJetStream) -> JetStreamContext:
    return fake  # type: ignore[return-value]


@pytest.mark.parametrize("replicas", [1, 3])
def test_every_stream_config_carries_the_replicas(replicas: int) -> None:
    for spec in STREAMS:
        assert topology._stream_config(spec, replicas).num_replicas == replicas


def test_the_default_is_one_replica_for_a_single_server() -> None:
    assert all(topology._stream_config(spec).num_replicas == 1 for spec in STREAMS)


async def test_apply_topology_replicates_new_and_existing_streams_and_buckets() -> None:
    fake = FakeJetStream(existing=frozenset({"TANDEM_ITEMS", "TANDEM_LABELS"}))

    await apply_topology(_js(fake), 3)

    assert {c.name for c in fake.updated} == {"TANDEM_ITEMS", "TANDEM_LABELS"}
    assert {c.name for c in fake.added} == {s.name for s in STREAMS} - {"TANDEM_ITEMS", "TANDEM_LABELS"}
    assert all(c.num_replicas == 3 for c in fake.added + fake.updated)
    assert fake.buckets == dict.fromkeys(BUCKETS, 3)
    assert sorted(fake.consumers) == sorted(c.name for c in CONSUMERS)


async def test_a_bucket_made_with_other_replicas_is_updated_in_place() -> None:
    bucket = BUCKETS[0]
    fake = FakeJetStream(buckets_elsewhere={bucket: 1})

    await apply_topology(_js(fake), 3)

    (kv,) = [c for c in fake.updated if c.name == f"KV_{bucket}"]
    assert kv.num_replicas == 3
    assert kv.max_msgs_per_subject == 1  # the rest of the bucket's config is kept


async def test_other_bucket_errors_are_not_swallowed() -> None:
    class Refusing(FakeJetStream):
        async def create_key_value(self, *, bucket: str, history: int, replicas: int) -> None:
            raise BadRequestError(code=400, err_code=10074, description="replicas > 1 not supported")

    with pytest.raises(BadRequestError):
        await apply_topology(_js(Refusing()), 3)


async def test_replicas_below_one_are_refused() -> None:
    with pytest.raises(ValueError):
        await apply_topology(_js(FakeJetStream()), 0)


def test_settings_read_the_replicas_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TANDEM_NATS_STREAM_REPLICAS", raising=False)
    assert CommonSettings().nats_stream_replicas == 1
    monkeypatch.setenv("TANDEM_NATS_STREAM_REPLICAS", "3")
    assert CommonSettings().nats_stream_replicas == 3
    monkeypatch.setenv("TANDEM_NATS_STREAM_REPLICAS", "0")
    with pytest.raises(ValueError):
        CommonSettings()
