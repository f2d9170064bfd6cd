"""A short, stable name for a set of settings: the SHA-256 of their canonical JSON (sorted keys), cut short.
Outputs, progress records and bench-result tags are named by it, so a run with equal settings finds and reuses an
earlier run's work."""

from __future__ import annotations

import hashlib
import json

IN_FOLDER_NAMES = 12
"""The length used where the fingerprint is part of a folder name a reader sees (sweeps, recipes)."""


def fingerprint(identity: dict, length: int = 16) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:length]
