"""`Client`: Tandem from Python, synchronously, so a notebook cell simply blocks until the answer.

It speaks to the same gRPC APIs as the `tandem` CLI and finds the services and the token the same
way (services/cli/targets.py, services/cli/access.py). It uses gRPC's sync API rather than an
event loop in a thread: notebooks run their own loop, and a second one per client is a source of
deadlocks that the sync channels simply do not have.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, Self, TypeVar

import grpc

from services.cli.access import resolve_token
from services.cli.client import _RETRY as RETRY_SERVICE_CONFIG
from services.cli.client import STATS_SERVICES
from services.cli.targets import resolve_targets
from services.gen.tandem.export.v1 import export_pb2, export_pb2_grpc
from services.gen.tandem.ingest.v1 import ingest_pb2, ingest_pb2_grpc
from services.gen.tandem.projects.v1 import projects_pb2
from services.gen.tandem.stats.v1 import stats_pb2, stats_pb2_grpc
from tandem.errors import AlreadyExists, InvalidArgument, TandemError, from_rpc_error
from tandem.models import ExportInfo, IngestSummary, Project, Rejection, Status

if TYPE_CHECKING:
    import pandas as pd

T = TypeVar("T")
Until = Literal["finalized", "certified"]

# Project settings that are not plain scalars, or that the SDK's own arguments already cover.
_OWN_FIELDS = frozenset({"project_id", "labels", "target_accuracy", "instructions", "created_unix_ms"})
_SETTINGS = frozenset(projects_pb2.Project.DESCRIPTOR.fields_by_name) - _OWN_FIELDS


def _channel(target: str) -> grpc.Channel:
    """A channel with the CLI's retry policy; TLS when TANDEM_TLS_CA_FILE names the services' CA."""
    opts = [("grpc.service_config", RETRY_SERVICE_CONFIG), ("grpc.max_receive_message_length", 64 << 20)]
    ca = os.environ.get("TANDEM_TLS_CA_FILE")
    if ca:
        credentials = grpc.ssl_channel_credentials(root_certificates=Path(ca).read_bytes())
        return grpc.secure_channel(target, credentials, options=opts)
    return grpc.insecure_channel(target, options=opts)


def _unix_ms(at: datetime | None) -> int:
    """A filter's time as unix ms (0 = unset); a naive datetime is UTC."""
    if at is None:
        return 0
    return int((at if at.tzinfo else at.replace(tzinfo=UTC)).timestamp() * 1000)


def _is_missing(value: object) -> bool:
    # A DataFrame gives NaN (or None, pd.NA) for empty cells: those are no metadata, not "nan".
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return True
    return type(value).__name__ in ("NAType", "NaTType")


class Client:
    """Tandem's gRPC APIs as plain Python calls.

    `state_dir` (default: TANDEM_STATE_DIR, else ".state") is where `tandem up` writes the services'
    addresses (targets.json) and the admin's token; TANDEM_<SERVICE>_TARGET variables and `targets`
    override the addresses, TANDEM_TOKEN and `token` the token.
    """

    def __init__(
        self,
        state_dir: str | os.PathLike[str] | None = None,
        token: str | None = None,
        targets: Mapping[str, str] | None = None,
        *,
        timeout: float = 30.0,
    ) -> None:
        state = Path(state_dir if state_dir is not None else os.environ.get("TANDEM_STATE_DIR", ".state"))
        overrides: dict[str, str | None] = dict(targets or {})
        self.targets = resolve_targets(state, overrides)
        self._token = resolve_token(state, token)
        self._metadata: tuple[tuple[str, str], ...] = (
            (("authorization", f"Bearer {self._token}"),) if self._token else ()
        )
        self._timeout = timeout
        # One channel per address: in a single-process deployment several services share one.
        self._channels: dict[str, grpc.Channel] = {}
        self._ingest = ingest_pb2_grpc.IngestServiceStub(self._channel_for("ingest"))
        self._export = export_pb2_grpc.ExportServiceStub(self._channel_for("export"))
        self._stats = [stats_pb2_grpc.StatsServiceStub(self._channel_for(name)) for name in STATS_SERVICES]

    def _channel_for(self, service: str) -> grpc.Channel:
        target = self.targets[service]
        if target not in self._channels:
            self._channels[target] = _channel(target)
        return self._channels[target]

    # -- lifecycle ------------------------------------------------------------------------------

    def close(self) -> None:
        for ch in self._channels.values():
            ch.close()
        self._channels.clear()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Client(ingest={self.targets['ingest']!r}, token={'set' if self._token else 'none'})"

    @contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except grpc.RpcError as exc:
            hint = ""
            if (
                isinstance(exc, grpc.Call)
                and exc.code() == grpc.StatusCode.UNAUTHENTICATED
                and not self._token
            ):
                hint = "no token: pass token=, set TANDEM_TOKEN, or run `tandem login`"
            elif isinstance(exc, grpc.Call) and exc.code() == grpc.StatusCode.UNAVAILABLE:
                hint = f"is the stack running (`tandem up`)? ingest at {self.targets['ingest']}"
            raise from_rpc_error(exc, hint=hint) from exc

    def _call(self, method: Callable[..., T], request: Any, timeout: float | None = None) -> T:
        with self._errors():
            return method(request, timeout=timeout or self._timeout, metadata=self._metadata)

    # -- projects -------------------------------------------------------------------------------

    def create_project(
        self,
        project_id: str,
        labels: Mapping[str, str] | Sequence[str],
        *,
        target_accuracy: float = 0.95,
        instructions: str = "",
        **settings: Any,
    ) -> Project:
        """Creates a labeling project. `labels` maps each label to a description (the model reads
        the descriptions; write them like an example of the class), or lists bare names.

        `settings` are the other project fields of proto/tandem/projects/v1/projects.proto, e.g.
        name, audit_rate, human_budget_items, human_budget_share, guarantee ("dataset" or
        "automatic"), delta, overlap, hide_suggestions; `pools` may be a {pool_id: share} mapping.

        Safe to run again: the same id and labels return the existing project (to its creator or
        members); an id someone else took, or one with other labels, raises AlreadyExists.
        """
        if isinstance(labels, str):
            raise TypeError("labels must be a mapping label → description or a list of names, not a string")
        defs = (
            [projects_pb2.LabelDef(name=k, description=v) for k, v in labels.items()]
            if isinstance(labels, Mapping)
            else [projects_pb2.LabelDef(name=str(name)) for name in labels]
        )
        unknown = sorted(set(settings) - _SETTINGS)
        if unknown:
            raise TypeError(f"unknown project settings {unknown}; known: {sorted(_SETTINGS)}")
        pools = settings.pop("pools", None)
        if isinstance(pools, Mapping):
            settings["pools"] = [
                projects_pb2.PoolShare(pool_id=str(k), share=float(v)) for k, v in pools.items()
            ]
        elif pools is not None:
            settings["pools"] = pools
        try:
            project = projects_pb2.Project(
                project_id=project_id,
                labels=defs,
                target_accuracy=target_accuracy,
                instructions=instructions,
                **settings,
            )
        except (TypeError, ValueError) as exc:
            raise InvalidArgument(f"invalid project settings: {exc}") from exc
        made = Project.from_proto(
            self._call(self._ingest.CreateProject, ingest_pb2.CreateProjectRequest(project=project))
        )
        # The service answers a repeated create with the existing project (a retry, a notebook cell
        # run twice); one with other labels is a different project under a taken id.
        if list(made.labels) != [d.name for d in defs]:
            raise AlreadyExists(f"project {project_id!r} exists already, with labels {list(made.labels)}")
        return made

    def get_project(self, project_id: str) -> Project:
        return Project.from_proto(
            self._call(self._ingest.GetProject, ingest_pb2.GetProjectRequest(project_id=project_id))
        )

    def projects(self) -> list[Project]:
        """The projects this token may read."""
        response = self._call(self._ingest.ListProjects, ingest_pb2.ListProjectsRequest())
        return [Project.from_proto(p) for p in response.projects]

    # -- ingest ---------------------------------------------------------------------------------

    def ingest(
        self,
        project_id: str,
        items: Iterable[Mapping[str, Any]] | pd.DataFrame,
        *,
        text: str = "text",
        id: str = "id",
        metadata: Sequence[str] | None = None,
        batch: int = 500,
    ) -> IngestSummary:
        """Sends items (dicts, or the rows of a DataFrame) to the project over one stream.

        `text` and `id` name the fields that hold each item's text and its id (ids are yours: the
        export gives them back). Every other field becomes metadata unless `metadata` names the
        ones to keep. Items without an id get their position (a DataFrame's index label). Bad items
        are not an error: they come back in `IngestSummary.rejections` with the reason.
        """
        if batch < 1:
            raise ValueError("batch must be at least 1")
        pandas = sys.modules.get("pandas")
        if pandas is not None and isinstance(items, pandas.DataFrame) and text not in items.columns:
            # One clear error, not a rejection per row.
            raise ValueError(f"the DataFrame has no {text!r} column; name the text column with text=...")
        rows = self._rows(items, id)
        skip = {text, id}

        def raw(row: Mapping[str, Any], fallback: str) -> ingest_pb2.RawItem:
            value = row.get(text)
            keys = metadata if metadata is not None else [k for k in row if k not in skip]
            meta = {str(k): str(row[k]) for k in keys if k in row and not _is_missing(row[k])}
            external = row.get(id)
            return ingest_pb2.RawItem(
                external_id=fallback if _is_missing(external) else str(external),
                # Bytes, so the service (not the SDK) judges the text and answers per item.
                text=b"" if _is_missing(value) else str(value).encode("utf-8", "surrogatepass"),
                metadata=meta,
            )

        def requests() -> Iterator[ingest_pb2.SubmitBatchRequest]:
            chunk: list[ingest_pb2.RawItem] = []
            for fallback, row in rows:
                chunk.append(raw(row, fallback))
                if len(chunk) >= batch:
                    yield ingest_pb2.SubmitBatchRequest(project_id=project_id, items=chunk)
                    chunk = []
            if chunk:
                yield ingest_pb2.SubmitBatchRequest(project_id=project_id, items=chunk)

        response = self._call(self._ingest.BulkSubmit, requests(), timeout=3600.0)
        return IngestSummary(
            accepted=response.accepted,
            duplicates=response.duplicates,
            rejected=response.rejected,
            rejections=[Rejection(id=r.external_id, reason=r.reason) for r in response.rejections],
        )

    @staticmethod
    def _rows(
        items: Iterable[Mapping[str, Any]] | pd.DataFrame, id_field: str
    ) -> Iterator[tuple[str, Mapping[str, Any]]]:
        """(fallback id, row) pairs, lazily, so a large frame or generator is never copied whole."""
        # pandas may be absent from the caller's process: a DataFrame can only exist if it is loaded.
        pandas = sys.modules.get("pandas")
        if pandas is not None and isinstance(items, pandas.DataFrame):
            columns = [str(c) for c in items.columns]
            for index, values in zip(items.index, items.itertuples(index=False, name=None), strict=True):
                yield str(index), dict(zip(columns, values, strict=True))
            return
        for position, row in enumerate(items):
            if not isinstance(row, Mapping):
                raise TypeError(f"item {position} is a {type(row).__name__}, not a mapping")
            yield str(position), row

    # -- progress -------------------------------------------------------------------------------

    def status(self, project_id: str) -> Status:
        """Every service's part of the project's stats, asked for in parallel and merged."""
        request = stats_pb2.GetProjectStatsRequest(project_id=project_id)
        with self._errors():
            futures = [
                stub.GetProjectStats.future(request, timeout=self._timeout, metadata=self._metadata)
                for stub in self._stats
            ]
            merged = stats_pb2.ProjectStats(project_id=project_id)
            for future in futures:
                merged.MergeFrom(future.result())
        return Status.from_proto(merged)

    def wait(
        self,
        project_id: str,
        *,
        until: Until = "finalized",
        timeout: float | None = 3600.0,
        poll: float = 1.0,
        on_status: Callable[[Status], None] | None = None,
    ) -> Status:
        """Blocks until every ingested item has a final label ("finalized") and, for
        until="certified", the certificate also meets the target. Returns that Status; raises
        TimeoutError after `timeout` seconds (None: wait forever). `on_status` sees every poll,
        e.g. to print progress."""
        if until not in ("finalized", "certified"):
            raise ValueError("until must be 'finalized' or 'certified'")
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            s = self.status(project_id)
            if on_status is not None:
                on_status(s)
            if s.done and (until == "finalized" or s.certified):
                return s
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(
                    f"project {project_id} not {until} after {timeout:.0f}s: {s.finalized}/{s.items} "
                    f"items finalized, {s.in_review} waiting for people, certified={s.certified}"
                )
            time.sleep(poll if deadline is None else max(0.0, min(poll, deadline - time.monotonic())))

    # -- export ---------------------------------------------------------------------------------

    def export(
        self,
        project_id: str,
        *,
        sources: Sequence[str] = (),
        min_confidence: float = 0.0,
        since: datetime | None = None,
        until: datetime | None = None,
        where: Mapping[str, str] | None = None,
        certified_only: bool = False,
        on_progress: Callable[[ExportInfo], None] | None = None,
    ) -> list[dict[str, Any]]:
        """A snapshot of the project's final labels, one dict per item: id, item_id, text, label,
        source ("auto", "human", or "model" when the human budget ran out), confidence, metadata and
        the people's raw_labels. Items still without a final label are not in it (see `wait`).

        Only the labels every filter given keeps: from `sources`, at least `min_confidence`,
        finalized in [since, until) (naive datetimes are UTC), items whose metadata has every
        `where` field = value, and with `certified_only` none below the project's target. The
        snapshot is a job: `on_progress` is called with its state while it builds. The rows are
        checked against the snapshot's checksum."""
        info = self._call(
            self._export.CreateExport,
            export_pb2.CreateExportRequest(
                project_id=project_id,
                filter=export_pb2.ExportFilter(
                    sources=list(sources),
                    min_confidence=min_confidence,
                    finalized_after_unix_ms=_unix_ms(since),
                    finalized_before_unix_ms=_unix_ms(until),
                    metadata=dict(where or {}),
                    certified_only=certified_only,
                ),
            ),
            timeout=600.0,
        )
        info = self._wait_export(info, on_progress)
        rows: list[dict[str, Any]] = []
        digest = hashlib.sha256()
        with self._errors():
            for chunk in self._export.StreamExport(
                export_pb2.StreamExportRequest(export_id=info.export_id),
                timeout=3600.0,
                metadata=self._metadata,
            ):
                digest.update(chunk.jsonl)
                rows.extend(json.loads(line) for line in chunk.jsonl.decode("utf-8").splitlines() if line)
        if len(rows) != info.rows:
            # A short stream must never pass for a complete dataset.
            raise TandemError(f"export {info.export_id}: expected {info.rows} rows, received {len(rows)}")
        if info.checksum and digest.hexdigest() != info.checksum:
            raise TandemError(f"export {info.export_id}: the data received is not the snapshot's (SHA-256)")
        return rows

    def exports(self, project_id: str, limit: int = 50) -> list[ExportInfo]:
        """The project's export snapshots, newest version first."""
        listed = self._call(
            self._export.ListExports,
            export_pb2.ListExportsRequest(project_id=project_id, limit=limit),
            timeout=30.0,
        )
        return [ExportInfo.from_proto(e) for e in listed.exports]

    def _wait_export(
        self, info: export_pb2.ExportInfo, on_progress: Callable[[ExportInfo], None] | None, poll: float = 0.2
    ) -> export_pb2.ExportInfo:
        """The export once its job has ended (StreamExport would wait too; this one reports)."""
        while info.state == export_pb2.EXPORT_STATE_BUILDING:
            if on_progress is not None:
                on_progress(ExportInfo.from_proto(info))
            time.sleep(poll)
            info = self._call(
                self._export.GetExport, export_pb2.GetExportRequest(export_id=info.export_id), timeout=30.0
            )
        if on_progress is not None:
            on_progress(ExportInfo.from_proto(info))
        if info.state == export_pb2.EXPORT_STATE_FAILED:
            raise TandemError(f"export {info.export_id} failed: {info.error}")
        return info

    def export_dataframe(self, project_id: str, **filters: Any) -> pd.DataFrame:
        """`export` as a DataFrame; the same keyword filters."""
        import pandas as pd

        return pd.DataFrame(self.export(project_id, **filters))

    def export_dataset(self, project_id: str, **filters: Any) -> Any:
        """The export as a Hugging Face `datasets.Dataset` (the package is optional); the same
        keyword filters as `export`."""
        try:
            datasets = importlib.import_module("datasets")
        except ImportError as exc:
            raise ImportError(
                "export_dataset needs the Hugging Face `datasets` package: pip install datasets"
            ) from exc
        return datasets.Dataset.from_list(self.export(project_id, **filters))
