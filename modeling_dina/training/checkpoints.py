"""A training run's output folder: one run at a time, checkpoints that say when they are complete, and resuming from
the newest complete one.

`claim_output_dir` locks the folder for the run and refuses one that holds an earlier run unless it is resumed or
overwritten on purpose.

`CheckpointCompletionCallback` writes `checkpoint_complete.json` into a checkpoint once the `Trainer` has written all
of it (the public `on_save` hook runs after the whole save): the file sizes it holds, flushed to disk. A checkpoint
killed mid-save, interrupted by Ctrl-C or cut short by a full disk has no marker, or files that no longer match it,
and `latest_complete_checkpoint` passes over it, saying which one and why.
"""

import json
import logging
import os
import re
from contextlib import contextmanager

from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..safe_files import LOCK_NAME, exclusive_lock, fsync_path, write_json_atomic

logger = logging.getLogger(__name__)

COMPLETE_NAME = "checkpoint_complete.json"
_CHECKPOINT = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")


class CheckpointCompletionCallback(TrainerCallback):
    """After each checkpoint save (every process done), the main process records the checkpoint's files and sizes in
    `checkpoint_complete.json`, written last."""

    def on_save(self, args, state, control, **kwargs):
        args.distributed_state.wait_for_everyone()  # every process's RNG state is in the folder
        if args.should_save:
            mark_complete(os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"))
        return control


def mark_complete(checkpoint: str) -> None:
    """Flush a checkpoint's files to disk, then write its marker listing them."""
    files = {}
    for name in sorted(os.listdir(checkpoint)):
        path = os.path.join(checkpoint, name)
        if os.path.isfile(path) and name != COMPLETE_NAME:
            fsync_path(path)
            files[name] = os.path.getsize(path)
    write_json_atomic(os.path.join(checkpoint, COMPLETE_NAME), {"files": files})
    fsync_path(checkpoint)


def incomplete_reason(checkpoint: str) -> str | None:
    """Why a checkpoint folder cannot be resumed from, or None when its marker and files agree."""
    marker = os.path.join(checkpoint, COMPLETE_NAME)
    if not os.path.isfile(marker):
        return f"no {COMPLETE_NAME} (the save was interrupted)"
    try:
        with open(marker) as f:
            files = json.load(f)["files"]
    except (OSError, ValueError, KeyError) as err:
        return f"unreadable {COMPLETE_NAME} ({err})"
    for name, size in files.items():
        path = os.path.join(checkpoint, name)
        if not os.path.isfile(path):
            return f"{name} is missing"
        if os.path.getsize(path) != size:
            return f"{name} has {os.path.getsize(path)} bytes, {size} were written"
    return None


def latest_complete_checkpoint(output_dir: str) -> str:
    """The newest checkpoint of `output_dir` that is complete; each newer, incomplete one is logged with the reason.
    Raises `FileNotFoundError` when there is none."""
    steps = {}
    if os.path.isdir(output_dir):
        for name in os.listdir(output_dir):
            match = _CHECKPOINT.match(name)
            if match and os.path.isdir(os.path.join(output_dir, name)):
                steps[int(match.group(1))] = os.path.join(output_dir, name)
    skipped = []
    for step in sorted(steps, reverse=True):
        reason = incomplete_reason(steps[step])
        if reason is None:
            for path, why in skipped:
                logger.warning(f"resume: skipping {path}: {why}; resuming from {steps[step]}")
            return steps[step]
        skipped.append((steps[step], reason))
    details = "; ".join(f"{os.path.basename(path)}: {why}" for path, why in skipped) or "no checkpoint-* folder"
    raise FileNotFoundError(f"no complete checkpoint to resume from in {output_dir!r} ({details}).")


@contextmanager
def claim_output_dir(args, *, resume: bool, overwrite: bool, keep: tuple[str, ...] = ("_cache",)):
    """Lock `args.output_dir` for this run (main process) and refuse a folder holding anything but `keep` (a data
    cache reused by design) unless `resume` or `overwrite`. Other processes of a distributed run pass through."""
    if args.process_index != 0:
        yield
        return
    with exclusive_lock(args.output_dir, "a `dina train` run"):
        leftovers = sorted(set(os.listdir(args.output_dir)) - {LOCK_NAME, *keep})
        if leftovers and not (resume or overwrite):
            raise FileExistsError(
                f"output_dir {args.output_dir!r} already holds {leftovers[:5]}: pass --resume to continue that run, "
                "--overwrite-output-dir to write over it, or choose another output_dir."
            )
        yield


__all__ = [
    "COMPLETE_NAME",
    "CheckpointCompletionCallback",
    "claim_output_dir",
    "incomplete_reason",
    "latest_complete_checkpoint",
]
