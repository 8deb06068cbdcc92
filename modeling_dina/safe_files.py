"""Writing results so that nothing is left half-written: atomic files, an exclusive lock on a job's output, and a
full disk reported as such.

Used by `dina score-dataset` (its shards), `dina train` (its output folder and checkpoint markers) and
`DiNaRewardModel.save_pretrained`.
"""

import errno
import fcntl
import json
import os
import shutil
from contextlib import contextmanager

LOCK_NAME = "_dina.lock"  # `_*` is what `Trainer.push_to_hub` leaves out


def fsync_path(path: str) -> None:
    """Flush a file (or a folder's entries) to disk, so a rename after it cannot land before its content."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: str, value) -> None:
    """Write `value` as JSON to `path` through a temporary file and a rename: readers see the old or the new file."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(value, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@contextmanager
def exclusive_lock(folder: str, what: str):
    """Hold an exclusive lock on `folder` (a `_dina.lock` file) while the block runs; a second job on the same folder
    fails at once instead of writing over the first. The lock goes with the process, even when it is killed."""
    os.makedirs(folder, exist_ok=True)
    handle = open(os.path.join(folder, LOCK_NAME), "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise RuntimeError(f"{folder!r} is in use by {holder} ({what}); wait for it or use another folder.") from None
    handle.truncate(0)
    handle.write(f"pid {os.getpid()}")
    handle.flush()
    try:
        yield
    finally:
        handle.close()


def is_disk_full(err: BaseException) -> bool:
    """An `OSError(ENOSPC)`, or the `RuntimeError` torch raises when a write fails, somewhere in `err`'s chain."""
    while err is not None:
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if isinstance(err, RuntimeError) and "No space left" in str(err):
            return True
        err = err.__cause__ or err.__context__
    return False


@contextmanager
def full_disk_explained(folder: str, advice: str):
    """Turn a full disk while the block writes into `folder` into an `OSError(ENOSPC)` that says so, and what to do."""
    try:
        yield
    except Exception as err:
        if not is_disk_full(err):
            raise
        free = shutil.disk_usage(folder if os.path.isdir(folder) else os.path.dirname(folder) or ".").free
        message = f"the disk holding {folder!r} is full ({free / 2**20:.1f} MiB free) while writing: {advice}"
        raise OSError(errno.ENOSPC, message) from err


__all__ = ["LOCK_NAME", "exclusive_lock", "fsync_path", "full_disk_explained", "is_disk_full", "write_json_atomic"]
