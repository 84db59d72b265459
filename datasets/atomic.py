"""Writes that never leave a half-written file or dir behind: build beside the target, then rename over it."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path


def write_json_atomic(path: str | Path, payload: dict) -> None:
    """Write JSON to a temp file beside `path`, then rename: a crash never leaves a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def replace_dir(built: Path, final: Path) -> None:
    """Move the complete dir `built` to `final`; an existing `final` is removed only once `built` is in place."""
    final.parent.mkdir(parents=True, exist_ok=True)
    if not final.exists():
        built.rename(final)
        return
    old = final.with_name(f".{final.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    final.rename(old)
    built.rename(final)
    shutil.rmtree(old)
