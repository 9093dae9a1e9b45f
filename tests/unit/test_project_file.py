"""Project files: YAML's bare yes/no are booleans, and must not become labels named "True"."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.cli.files import InputError, load_project


def test_bare_yes_no_labels_are_refused_and_quoted_ones_work(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text("project_id: x\nlabels: [yes, no]\n")
    with pytest.raises(InputError, match="quote labels"):
        load_project(path)
    path.write_text("project_id: x\nlabels: {'yes': agrees, 'no': disagrees}\n")
    assert [lb.name for lb in load_project(path).labels] == ["yes", "no"]
