"""What every benchmark script records and how it writes its results."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def project_commit() -> str:
    """This checkout's commit, marked when the tree has uncommitted changes."""
    try:
        rev = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain"], capture_output=True, text=True)
    except OSError:
        return "unknown"
    return rev.stdout.strip() + ("+uncommitted changes" if dirty.stdout.strip() else "")


def write_json(path: Path, data: dict) -> None:
    """Atomically, so an interrupted run leaves the previous file intact (runs resume from it)."""
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)
