"""Reading the CLI's input files: project definitions (YAML/JSON) and items (JSONL/CSV)."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from services.gen.tandem.projects.v1 import projects_pb2


class InputError(ValueError):
    """A problem with a file the user gave; the message says what to fix."""


def load_project(path: Path) -> projects_pb2.Project:
    try:
        raw = path.read_text(encoding="utf-8")
        data: Any = json.loads(raw) if path.suffix == ".json" else yaml.safe_load(raw)
    except (OSError, ValueError, yaml.YAMLError) as exc:
        raise InputError(f"cannot read project file {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a mapping with project_id and labels")
    labels = data.get("labels")
    if isinstance(labels, dict):
        labels = [{"name": k, "description": v or ""} for k, v in labels.items()]
    if not isinstance(labels, list) or not labels:
        raise InputError(
            f"{path}: 'labels' must be a list of {{name, description}} or a name → description map"
        )
    names = [lb.get("name") if isinstance(lb, dict) else lb for lb in labels]
    if any(isinstance(n, bool) for n in names):
        # YAML reads a bare yes/no/on/off as a boolean: the label would silently become "True".
        raise InputError(f"{path}: a label reads as true/false: quote labels such as 'yes' and 'no'")
    try:
        return projects_pb2.Project(
            project_id=str(data.get("project_id") or data.get("id") or ""),
            name=str(data.get("name") or ""),
            instructions=str(data.get("instructions") or ""),
            target_accuracy=float(data.get("target_accuracy") or 0.0),
            audit_rate=float(data.get("audit_rate") or 0.0),
            human_budget_items=int(data.get("human_budget_items") or 0),
            human_budget_share=float(data.get("human_budget_share") or 0.0),
            control_rate=float(data.get("control_rate") or 0.0),
            guarantee=str(data.get("guarantee") or ""),
            delta=float(data.get("delta") or 0.0),
            human_error=float(data.get("human_error") or 0.0),
            hide_suggestions=bool(data.get("hide_suggestions") or False),
            pools=_pools(data.get("pools")),
            skill_fields=_names(data.get("skill_fields"), "skill_fields"),
            overlap=int(data.get("overlap") or 0),
            max_overlap=int(data.get("max_overlap") or 0),
            overlap_below_confidence=float(data.get("overlap_below_confidence") or 0.0),
            sla_seconds=float(data.get("sla_seconds") or 0.0),
            gold_first=int(data.get("gold_first") or 0),
            gold_first_share=float(data.get("gold_first_share") or 0.0),
            gold_share=float(data.get("gold_share") or 0.0),
            quality_bar=float(data.get("quality_bar") or 0.0),
            labels=[
                projects_pb2.LabelDef(name=str(lb["name"]), description=str(lb.get("description") or ""))
                if isinstance(lb, dict)
                else projects_pb2.LabelDef(name=str(lb))
                for lb in labels
            ],
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(f"{path}: invalid project definition: {exc}") from exc


def _pools(value: Any) -> list[projects_pb2.PoolShare]:
    """`pools:` as a mapping pool → share (the usual form), or a list of pool ids (share 1 each)
    or of {pool_id, share}."""
    if value is None:
        return []
    if isinstance(value, dict):
        return [projects_pb2.PoolShare(pool_id=str(k), share=float(v)) for k, v in value.items()]
    if isinstance(value, list):
        return [
            projects_pb2.PoolShare(pool_id=str(p["pool_id"]), share=float(p.get("share", 1.0)))
            if isinstance(p, dict)
            else projects_pb2.PoolShare(pool_id=str(p), share=1.0)
            for p in value
        ]
    raise TypeError("'pools' must map pool ids to shares, e.g. {inhouse: 1, vendor_a: 3}")


def _names(value: Any, key: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [str(v) for v in value]
    raise TypeError(f"'{key}' must be a list of names")


@dataclass(frozen=True)
class Record:
    external_id: str
    text: bytes
    label: str
    metadata: dict[str, str]


def read_records(
    path: Path, *, id_field: str = "id", text_field: str = "text", label_field: str = "label"
) -> Iterator[Record]:
    """JSONL or CSV rows. Text is passed on as bytes so the service, not the CLI, judges encoding."""
    if not path.exists():
        raise InputError(f"no such file: {path}")
    if path.suffix.lower() == ".csv":
        yield from _read_csv(path, id_field, text_field, label_field)
    else:
        yield from _read_jsonl(path, id_field, text_field, label_field)


def _meta(row: dict[str, Any], skip: set[str]) -> dict[str, str]:
    return {
        str(k): str(v) for k, v in row.items() if k not in skip and isinstance(v, str | int | float | bool)
    }


def _read_jsonl(path: Path, id_field: str, text_field: str, label_field: str) -> Iterator[Record]:
    with path.open("rb") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as exc:
                raise InputError(f"{path}:{lineno}: not valid JSON: {exc}") from exc
            if not isinstance(row, dict):
                raise InputError(f"{path}:{lineno}: each line must be a JSON object")
            text = row.get(text_field)
            yield Record(
                external_id=str(row.get(id_field) or f"{path.name}:{lineno}"),
                text=str(text).encode("utf-8", "surrogatepass") if text is not None else b"",
                label=str(row.get(label_field) or ""),
                metadata=_meta(row, {id_field, text_field, label_field}),
            )


def _read_csv(path: Path, id_field: str, text_field: str, label_field: str) -> Iterator[Record]:
    with path.open(newline="", encoding="utf-8", errors="surrogateescape") as fh:
        for lineno, row in enumerate(csv.DictReader(fh), start=2):
            if text_field not in row:
                raise InputError(f"{path}: no '{text_field}' column (use --text-field)")
            yield Record(
                external_id=str(row.get(id_field) or f"{path.name}:{lineno}"),
                text=(row.get(text_field) or "").encode("utf-8", "surrogateescape"),
                label=str(row.get(label_field) or ""),
                metadata=_meta(row, {id_field, text_field, label_field}),
            )
