"""Provenance of a run: the short recipe hash written into checkpoints and metrics.

At the bottom of the package (no mimlib imports), so the config, the engines and the
analysis all read the same hash function without importing each other.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Mapping


def recipe_hash(recipe: Mapping[str, Any]) -> str:
    """Short stable hash of a recipe, recorded in checkpoints and metrics for provenance."""
    blob = json.dumps(recipe, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]
