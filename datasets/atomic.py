"""Writes that never leave a half-written file or dir behind: build beside the target, then rename over it."""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _umask() -> int:
    """The process's umask, read without setting it (os.umask would change it for other threads meanwhile)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)  # no /proc (macOS): set and restore
    os.umask(mask)
    return mask


def write_json_atomic(path: str | Path, payload: dict) -> None:
    """Write JSON to a temp file beside `path`, then rename: a crash never leaves a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # as open() would make it (mkstemp's is private: 0600)
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


@contextmanager
def building_dir(parent: Path, name: str) -> Iterator[Path]:
    """A new hidden dir in `parent` to build `name` in (then renamed into place by the caller), removed on the way out
    whatever happens. Its name carries this host and process id, so that what a killed build (SIGKILL, out of
    memory: no cleanup runs) left behind is removed by the next build of `name` on this host, and another process's
    build in progress is left alone."""
    parent.mkdir(parents=True, exist_ok=True)
    owner = f".{name}.building-{socket.gethostname()}"
    for stale in parent.glob(f"{owner}-*"):
        head, pid, _ = stale.name.rsplit("-", 2)  # mkdtemp's random part holds no "-"; a host name may
        if head == owner and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(dir=parent, prefix=f"{owner}-{os.getpid()}-"))
    tmp.chmod(0o777 & ~_umask())  # as mkdir would make it (mkdtemp's is private: 0700): others may read the result
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True
