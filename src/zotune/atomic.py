"""Write a file so that a reader never sees half of it.

Runs are killed (a session's time limit, Ctrl-C, an OOM) and resumed from what they
wrote, so every state file -- a run's config and logs, ``tune.json``, the regime
study's ``results.json``, the bf16 speed cache -- is written to a temporary file in
the same folder and then renamed over the old one: ``os.replace`` is atomic on one
filesystem, so the file is either the old version or the new one, never torn. The
temporary name carries the process id, so two processes writing the same file
(two bench workers sharing an output folder) never write into each other's
temporary file; the last rename wins whole.
"""

from __future__ import annotations

import os
from pathlib import Path


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Replace ``path`` with ``text`` (UTF-8) in one rename; returns the path."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        if tmp.exists():  # the write or rename raised (a full disk): leave no litter
            tmp.unlink()
    return path
