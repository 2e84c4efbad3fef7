"""One run per work directory: a lock file naming its holder, held for the whole run.

    with workdir_lock.hold(workdir, echo=print):   # raises LockedError if a live run holds it
        ...

The file `WORKDIR/RUN.lock` holds JSON: host, pid, the process's start time (from /proc, to
tell a reused pid from the holder), when the lock was taken and the command line. It is created
atomically with its content (a hard link), so of two runs started together exactly one gets it; it is
removed when the run ends, also on an error or a signal. A lock left by a process that no longer
runs on this host (killed with SIGKILL, a crashed machine) is stale: the next run takes it over
with a message. A lock of another host cannot be checked from here: the run stops and says how
to remove the file once that run is known to be gone. Only process 0 of a multi-host run calls
`hold` (the pipeline tells the others whether it got the lock).
"""
from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import pathlib
import socket
import sys

from fifa_jax.errors import InputError

LOCK_FILE = "RUN.lock"


class LockedError(InputError):
    """Another live run holds the work directory (the message names it)."""


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux /proc), or None."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            stat = f.read()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]     # field 22 of the whole line


def _alive(pid: int, start: str | None) -> bool:
    """Whether process `pid` (started at `start`, when known) still runs on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:          # someone else's process: it exists
        pass
    now = _start_time(pid)
    return start is None or now is None or now == start


def _record() -> dict:
    pid = os.getpid()
    return {"host": socket.gethostname(), "pid": pid, "start_time": _start_time(pid),
            "since": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(sys.argv)[:500]}


def _read(path: pathlib.Path) -> dict | None:
    """The holder's record; None when the file is gone; {} when it is unreadable (a run that
    died between creating and writing it)."""
    try:
        return json.loads(path.read_text(encoding="utf-8") or "{}")
    except FileNotFoundError:
        return None
    except (ValueError, UnicodeDecodeError):
        return {}


def _describe(holder: dict) -> str:
    return (f"pid {holder.get('pid')} on host {holder.get('host')} (since {holder.get('since')}: "
            f"{holder.get('command') or 'command unknown'})")


def _try_create(path: pathlib.Path, record: dict) -> bool:
    """Create the lock with its content in one step (a hard link of a written temporary
    file: fails when the lock exists), so no reader ever sees it empty."""
    tmp = path.with_name(f"{path.name}.{record['host']}.{record['pid']}.tmp")
    tmp.write_text(json.dumps(record), encoding="utf-8")
    try:
        os.link(tmp, path)
    except FileExistsError:
        return False
    except OSError:              # no hard links here (some FUSE mounts): create exclusively
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(record, f)
    finally:
        tmp.unlink(missing_ok=True)
    return True


@contextlib.contextmanager
def _guard(workdir):
    """An flock on the work directory itself, held while a stale lock is replaced, so two runs
    that both found it stale cannot both take it (the second sees the first's new lock)."""
    fd = os.open(workdir, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def acquire(workdir, echo=print) -> dict:
    """Take WORKDIR's lock; returns this run's record. Raises LockedError naming the holder."""
    path = pathlib.Path(workdir) / LOCK_FILE
    record = _record()
    for _ in range(3):           # a stale lock removed by another run in between: try again
        if _try_create(path, record):
            return record
        holder = _read(path)
        if holder is None:
            continue
        same_host = holder.get("host") == record["host"]
        if holder and not same_host:
            raise LockedError(
                f"work directory {workdir} is in use by another run: {_describe(holder)}; "
                f"that host cannot be checked from here: if that run has ended, delete "
                f"{path} and run again")
        pid = holder.get("pid")
        if holder and isinstance(pid, int) and _alive(pid, holder.get("start_time")):
            raise LockedError(f"work directory {workdir} is in use by another run: "
                              f"{_describe(holder)}; wait for it to end or use another "
                              f"--workdir")
        with _guard(workdir):    # one taker at a time: re-read, then replace
            if _read(path) != holder:
                continue
            echo(f"taking over the stale lock {path} of "
                 + (f"{_describe(holder)}, which no longer runs" if holder else
                    "a run that died while taking it"))
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            if _try_create(path, record):
                return record
    raise LockedError(f"could not take the lock {path}: other runs keep taking it")


def release(workdir, record: dict) -> None:
    """Remove WORKDIR's lock if it is still this run's."""
    path = pathlib.Path(workdir) / LOCK_FILE
    holder = _read(path)
    if holder and holder.get("pid") == record["pid"] and holder.get("host") == record["host"]:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


@contextlib.contextmanager
def hold(workdir, echo=print):
    """Hold WORKDIR's lock for the `with` block (released on any exit)."""
    record = acquire(workdir, echo)
    try:
        yield record
    finally:
        release(workdir, record)
