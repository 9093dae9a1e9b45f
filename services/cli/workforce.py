"""Simulated annotators: they answer review tasks from gold labels, with a set error rate and speed.

This is the benchmark workforce: it talks to the real review service over gRPC exactly like a
person's tool would (lease, answer, submit), so the loop is measured end to end. Each simulated
annotator is a real user (role annotator, member of the project) who logs in with a password
and works with their own session token, so every label carries a real identity.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import grpc

from services.cli.client import Clients
from services.gen.tandem.identity.v1 import identity_pb2
from services.gen.tandem.review.v1 import review_pb2


@dataclass(frozen=True)
class Profile:
    """One simulated person: how often they are right, how fast, whether they answer at random."""

    name: str
    accuracy: float = 0.98
    seconds_per_item: float = 0.25
    spammer: bool = False
    # Accuracy on items of given slices, (slice value, accuracy): someone who errs on one domain only.
    slice_accuracy: tuple[tuple[str, float], ...] = ()

    def accuracy_on(self, slice_value: str | None) -> float:
        return dict(self.slice_accuracy).get(slice_value or "", self.accuracy)


@dataclass(frozen=True)
class WorkforceConfig:
    project_id: str
    annotators: int = 4
    error_rate: float = 0.02
    seconds_per_item: float = 0.25
    seed: int = 7
    idle_poll_seconds: float = 0.2
    # A heterogeneous workforce; empty = `annotators` alike at `error_rate` and `seconds_per_item`.
    profiles: tuple[Profile, ...] = ()

    def people(self) -> tuple[Profile, ...]:
        if self.profiles:
            return self.profiles
        return tuple(
            Profile(f"sim-{i + 1:02d}", 1.0 - self.error_rate, self.seconds_per_item)
            for i in range(self.annotators)
        )


@dataclass
class WorkforceStats:
    submitted: int = 0
    wrong_on_purpose: int = 0
    no_gold: int = 0
    refused: int = 0
    seconds_busy: float = 0.0
    by_annotator: dict[str, int] = field(default_factory=dict)
    # People the gold check paused, with the tasks they had answered by then.
    paused_after: dict[str, int] = field(default_factory=dict)


Done = Callable[[], Awaitable[bool]]


class Workforce:
    def __init__(
        self,
        clients: Clients,
        gold: dict[str, str],
        config: WorkforceConfig,
        slices: dict[str, str] | None = None,
    ) -> None:
        """gold: external id → the right label. slices: external id → the item's slice value, for
        profiles whose accuracy differs by slice."""
        self._clients = clients
        self._gold = gold
        self._slices = slices or {}
        self._config = config
        self.stats = WorkforceStats()

    async def run(self, done: Done, stop: asyncio.Event | None = None) -> WorkforceStats:
        """Annotate until `done()` says the project needs nobody any more (or `stop` is set)."""
        stop = stop or asyncio.Event()
        finished = asyncio.Event()

        async def watch() -> None:
            while not stop.is_set() and not finished.is_set():
                try:
                    if await done():
                        finished.set()
                        return
                except grpc.aio.AioRpcError as exc:
                    # A service restarting (the fault tests kill them) is asked again next time.
                    if exc.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                        finished.set()
                        raise
                except BaseException:
                    finished.set()  # the annotators stop; the error is raised below
                    raise
                await asyncio.sleep(0.5)

        people = self._config.people()
        sessions = [await self._log_in(p.name) for p in people]
        watcher = asyncio.create_task(watch())
        workers = [
            asyncio.create_task(self._annotator(session, person, i, finished, stop))
            for i, (person, session) in enumerate(zip(people, sessions, strict=True))
        ]
        try:
            await asyncio.gather(*workers)
            if watcher.done() and not watcher.cancelled() and watcher.exception() is not None:
                raise watcher.exception()  # type: ignore[misc]
        finally:
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)
            for session in sessions:
                with contextlib.suppress(grpc.aio.AioRpcError):
                    await session.identity.Logout(identity_pb2.LogoutRequest(), timeout=5)
                await session.close()
        return self.stats

    async def _log_in(self, name: str) -> Clients:
        """The annotator as a user of the project (created on first use), logged in."""
        identity = self._clients.identity
        project = self._config.project_id
        password = secrets.token_urlsafe(16)
        try:
            await identity.CreateUser(
                identity_pb2.CreateUserRequest(
                    user_id=name,
                    role=identity_pb2.ROLE_ANNOTATOR,
                    password=password,
                    display_name=f"Simulated annotator {name}",
                    project_ids=[project],
                ),
                timeout=30,
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.ALREADY_EXISTS:
                raise
            await identity.UpdateUser(
                identity_pb2.UpdateUserRequest(user_id=name, password=password), timeout=30
            )
            await identity.AddMember(
                identity_pb2.AddMemberRequest(project_id=project, user_id=name), timeout=10
            )
        login = await identity.Login(identity_pb2.LoginRequest(user_id=name, password=password), timeout=30)
        return Clients(self._clients.targets, token=login.token)

    async def _annotator(
        self, session: Clients, person: Profile, index: int, finished: asyncio.Event, stop: asyncio.Event
    ) -> None:
        rng = random.Random(self._config.seed * 1000 + index)
        cfg = self._config
        name = person.name
        while not finished.is_set() and not stop.is_set():
            try:
                task = await session.review.NextTask(
                    review_pb2.NextTaskRequest(project_id=cfg.project_id), timeout=10
                )
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.FAILED_PRECONDITION:
                    # Paused (the gold check found them out): they get no more work here.
                    self.stats.paused_after[name] = self.stats.by_annotator.get(name, 0)
                    return
                if exc.code() not in (
                    grpc.StatusCode.NOT_FOUND,
                    grpc.StatusCode.UNAVAILABLE,
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    # A claim slower than its deadline on a loaded machine: asked again (a lease it
                    # took meanwhile expires and its task returns to the queue).
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                ):
                    raise
                await asyncio.sleep(cfg.idle_poll_seconds)
                continue
            label = self._answer(task, rng, person)
            if person.seconds_per_item > 0:
                await asyncio.sleep(person.seconds_per_item)
            try:
                await session.review.SubmitLabel(
                    review_pb2.SubmitLabelRequest(
                        task_id=task.task_id,
                        lease_id=task.lease_id,
                        label=label,
                        seconds_spent=person.seconds_per_item,
                    ),
                    timeout=10,
                )
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.FAILED_PRECONDITION:
                    raise
                self.stats.refused += 1
                continue
            self.stats.submitted += 1
            self.stats.seconds_busy += person.seconds_per_item
            self.stats.by_annotator[name] = self.stats.by_annotator.get(name, 0) + 1

    def _answer(self, task: review_pb2.Task, rng: random.Random, person: Profile) -> str:
        truth = self._gold.get(task.external_id)
        labels = list(task.labels)
        if person.spammer:
            return rng.choice(labels)
        if truth is None or truth not in labels:
            self.stats.no_gold += 1
            return task.suggested_label or labels[0]
        if rng.random() >= person.accuracy_on(self._slices.get(task.external_id)):
            self.stats.wrong_on_purpose += 1
            return rng.choice([lb for lb in labels if lb != truth])
        return truth
