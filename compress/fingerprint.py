"""A short, stable name for a set of settings: the SHA-256 of their canonical JSON (sorted keys), cut short.
Outputs, progress records and bench-result tags are named by it, so a run with equal settings finds and reuses an
earlier run's work. And the identity of a model's weights (``source_hash``), which manifests record."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

IN_FOLDER_NAMES = 12
"""The length used where the fingerprint is part of a folder name a reader sees (sweeps, recipes)."""


def fingerprint(identity: dict, length: int = 16) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:length]


def source_hash(folder: Path) -> str:
    """SHA-256 over a model folder's weight files, in the order its index names them (what a manifest records as
    ``sha256_safetensors``)."""
    from compress.shards import weight_files

    digest = hashlib.sha256()
    for file in weight_files(folder):
        with file.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()
