"""Where zotune keeps what it caches: converted models, downloaded task data, per-machine measurements.

A module of its own so that the machine probe (:mod:`zotune.hardware`), the task
loaders and the model loader can all find it without importing one another.
"""

from __future__ import annotations

import os
from pathlib import Path


def zotune_home() -> Path:
    """Root of zotune's caches: ``$ZOTUNE_HOME``, else ``~/.cache/zotune``."""
    return Path(os.environ.get("ZOTUNE_HOME", Path.home() / ".cache" / "zotune")).expanduser()
