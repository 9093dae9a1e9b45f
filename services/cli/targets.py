"""Where the CLI finds the services: flags, then TANDEM_<SVC>_TARGET, then the file `tandem up`
writes into its state dir, then the services' default ports."""

from __future__ import annotations

import json
import os
from pathlib import Path

DEFAULT_PORTS = {
    "ingest": 50051,
    "inference": 50052,
    "scorer": 50053,
    "review": 50054,
    "export": 50055,
    "identity": 50056,
}
TARGETS_FILE = "targets.json"


def write_targets(state_dir: Path, targets: dict[str, str]) -> Path:
    path = state_dir / TARGETS_FILE
    path.write_text(json.dumps(targets, indent=2))
    return path


def resolve_targets(state_dir: Path, overrides: dict[str, str | None] | None = None) -> dict[str, str]:
    from_file: dict[str, str] = {}
    path = state_dir / TARGETS_FILE
    if path.exists():
        from_file = json.loads(path.read_text())
    out = {}
    for name, port in DEFAULT_PORTS.items():
        flag = (overrides or {}).get(name)
        out[name] = (
            flag
            or os.environ.get(f"TANDEM_{name.upper()}_TARGET")
            or from_file.get(name)
            or f"127.0.0.1:{port}"
        )
    return out
