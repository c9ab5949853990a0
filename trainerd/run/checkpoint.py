"""Checkpoints: the full training state, written atomically, verified on load.

Layout: `checkpoints/step_NNNNNN/state.pt` + `SHA256SUMS` (`<hex>  state.pt`). A checkpoint is
written into a hidden temp dir, fsynced, then renamed into place, so a directory named
`step_NNNNNN` is always complete; a crash mid-write leaves only a `.tmp-*` dir that is ignored.
`state.pt` holds plain tensors and python values only and loads with weights_only=True.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
from pathlib import Path

import torch

from protocol.rundir import RunPaths, list_checkpoints

STATE_FILE = "state.pt"
SUMS_FILE = "SHA256SUMS"
FORMAT_VERSION = 1
from trainerd.errors import CheckpointError


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def checkpoints_dir(paths: RunPaths) -> Path:
    """The run's checkpoints/ as a real directory inside it (created if missing); a link or
    anything else in its place is refused, so a checkpoint is never written elsewhere."""
    d = paths.checkpoints
    if d.is_symlink() or (d.exists() and not d.is_dir()):
        raise CheckpointError(f"{d} is not a directory of the run (a link or a file); refusing to write through it")
    d.mkdir(parents=True, exist_ok=True)
    return d


def save_checkpoint(paths: RunPaths, step: int, state: dict) -> Path:
    """Write `state` as the checkpoint of `step` atomically; returns its directory. A failed
    write (a full disk) leaves no temp dir behind and raises OSError naming the file."""
    checkpoints_dir(paths)
    final = paths.checkpoint_dir(step)
    tmp = paths.checkpoints / f".tmp-step_{step:06d}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    buf = io.BytesIO()
    torch.save({"format": FORMAT_VERSION, "step": step, **state}, buf)
    data = buf.getvalue()
    target = tmp / STATE_FILE
    try:
        tmp.mkdir()
        with open(target, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        target = tmp / SUMS_FILE
        with open(target, "w") as f:
            f.write(f"{hashlib.sha256(data).hexdigest()}  {STATE_FILE}\n")
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise OSError(e.errno, e.strerror, str(target)) from e
    if final.exists():  # the same step checkpointed again (after a resume): replace it
        old = paths.checkpoints / f".old-step_{step:06d}-{os.getpid()}"
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)
    _fsync_dir(paths.checkpoints)
    return final


def _entries(paths: RunPaths) -> list[Path]:
    """What the checkpoints dir holds ([] if it is missing or unreadable)."""
    try:
        return list(paths.checkpoints.iterdir())
    except OSError:
        return []


def remove_partial_checkpoints(paths: RunPaths) -> list[str]:
    """Delete the `.tmp-step_*` dirs a killed checkpoint write left behind (never loaded, but
    they hold a full model each). Only the run's writer, holding its lock, may call this."""
    removed = []
    for d in _entries(paths):
        if d.name.startswith(".tmp-step_") and d.is_dir():
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d.name)
    return removed


def prune_checkpoints(paths: RunPaths, keep_last: int, keep_every: int = 0) -> list[int]:
    """Retention: keep the newest `keep_last` complete checkpoints, and every one whose step
    is a multiple of `keep_every` (0: none of those); delete the rest. Returns the pruned steps.
    The newest checkpoint is always kept (resume needs it)."""
    cps = list_checkpoints(paths)
    keep = {s for s, _ in cps[-max(1, keep_last) :]}
    if keep_every > 0:
        keep |= {s for s, _ in cps if s % keep_every == 0}
    pruned = []
    for s, d in cps:
        if s not in keep:
            shutil.rmtree(d, ignore_errors=True)
            pruned.append(s)
    return pruned


def latest_checkpoint(paths: RunPaths) -> tuple[int, Path]:
    cps = list_checkpoints(paths)
    if not cps:
        raise CheckpointError(f"run {paths.root} has no complete checkpoint to resume from")
    return cps[-1]


def load_checkpoint(ckpt_dir: str | os.PathLike, map_location="cpu") -> dict:
    """Verify the checksum, then load with weights_only=True. Raises CheckpointError (one line)."""
    d = Path(ckpt_dir)
    state_path, sums_path = d / STATE_FILE, d / SUMS_FILE
    try:
        data = state_path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {d} is incomplete: {STATE_FILE} is missing") from None
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint {state_path}: {e.strerror}") from None
    try:
        expected = sums_path.read_text().split()[0]
    except (OSError, IndexError):
        raise CheckpointError(f"checkpoint {d} is incomplete: {SUMS_FILE} is missing or empty") from None
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected:
        raise CheckpointError(
            f"checkpoint {d} is corrupt: sha256 of {STATE_FILE} is {actual[:12]}..., expected {expected[:12]}..."
        )
    try:
        state = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as e:  # a checksum match makes this unlikely; still one line, never a traceback
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"checkpoint {d} cannot be loaded: {msg}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {d} has an unknown format")
    return state
