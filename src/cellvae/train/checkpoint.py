"""Training checkpoints, written atomically and read safely.

``checkpoint.pt`` holds the weights, the Adam state, the epoch and step (KL warm-up), the minibatch-order generator
and torch's global RNG (dropout, z samples), the early-stopping state (best weights, best epoch, epochs without
improvement), the history and the settings. It is written to a temporary file in the same directory, flushed and
fsynced, renamed over the old one and the directory fsynced, so the name ``checkpoint.pt`` only ever holds a complete
checkpoint; a leftover temporary file (a crash while writing) is ignored and removed. It holds plain tensors and
containers only (``torch.load(weights_only=True)``).
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
from pathlib import Path
from typing import Callable

import torch

from ..errors import CellvaeInputError
from ..data.fileio import fsync_dir as _fsync_dir
from ..data.fileio import writing, zip_damage

__all__ = ['CHECKPOINT_NAME', 'CHECKPOINT_VERSION', 'save_checkpoint', 'load_checkpoint']


CHECKPOINT_NAME = "checkpoint.pt"
CHECKPOINT_VERSION = 1
_TMP_PREFIX = f".{CHECKPOINT_NAME}."
_TMP_SUFFIX = ".tmp"
# Test hook: called with the temporary file's path after it is written and fsynced, before the rename
# (tests/crash_train.py uses it to kill a process in the middle of a checkpoint write).
_CHECKPOINT_HOOK: Callable[[Path], None] | None = None


# ------------------------------------------------------------------------------------------- checkpoints
def save_checkpoint(state: dict, checkpoint_dir: str | os.PathLike) -> Path:
    """Write ``state`` to ``checkpoint_dir/checkpoint.pt`` atomically: a temporary file in the same directory,
    flushed and fsynced, renamed over the old checkpoint, then the directory fsynced. A crash at any point leaves
    either the old or the new checkpoint under that name, never a partial one.

    ``state`` must hold only tensors and plain containers/scalars (it is read with ``weights_only=True``).
    """
    d = Path(checkpoint_dir)
    d.mkdir(parents=True, exist_ok=True)
    target = d / CHECKPOINT_NAME
    fd, tmp_name = tempfile.mkstemp(prefix=_TMP_PREFIX, suffix=_TMP_SUFFIX, dir=d)
    tmp = Path(tmp_name)
    try:
        with writing(target), os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        if _CHECKPOINT_HOOK is not None:
            _CHECKPOINT_HOOK(tmp)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(d)
    return target


def load_checkpoint(checkpoint_dir: str | os.PathLike) -> dict | None:
    """The checkpoint in ``checkpoint_dir`` (None if there is none). Leftover temporary files of an interrupted
    write are removed first; they are never read.

    Raises:
        CellvaeInputError: the checkpoint cannot be read (not a cellvae checkpoint, damaged, or holding objects
            other than tensors and plain containers: nothing is unpickled beyond those).
    """
    d = Path(checkpoint_dir)
    for leftover in d.glob(f"{_TMP_PREFIX}*{_TMP_SUFFIX}"):
        with contextlib.suppress(OSError):
            leftover.unlink()
    path = d / CHECKPOINT_NAME
    if not path.exists():
        return None
    data = path.read_bytes()
    damage = zip_damage(data)
    if damage:
        raise CellvaeInputError(
            f"Checkpoint {str(path)!r} is damaged: {damage} (bit rot, a truncated copy or an edited file). Delete it "
            "(or its directory) to start training from the beginning."
        )
    try:
        state = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    except Exception as e:  # noqa: BLE001 - any failure to read is the same answer for the user
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise CellvaeInputError(
            f"Checkpoint {str(path)!r} cannot be read ({type(e).__name__}: {first}). It is damaged or not a cellvae "
            "checkpoint; delete it (or its directory) to start training from the beginning."
        ) from e
    if not isinstance(state, dict) or state.get("checkpoint_version") is None:
        raise CellvaeInputError(f"{str(path)!r} is not a cellvae training checkpoint; delete it to start over.")
    if int(state["checkpoint_version"]) > CHECKPOINT_VERSION:
        raise CellvaeInputError(
            f"Checkpoint {str(path)!r} has version {state['checkpoint_version']}, newer than this cellvae supports "
            f"({CHECKPOINT_VERSION}); upgrade cellvae to resume it."
        )
    return state


