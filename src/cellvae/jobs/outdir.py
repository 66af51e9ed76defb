"""The output directory of a job: checked, locked while the job writes it, and never clobbered.

:class:`OutputDir` is a context manager around a job:

- the directory must not be an input or hold one, must not be a file, and must be writable;
- an OS file lock (``fcntl.flock`` on ``DIR/.cellvae.lock``, released by the OS if the process dies) admits one
  writer at a time; a second job on the same directory is refused with a message that names the process holding it;
- a directory that holds anything is refused unless the job is told what to do with it: ``overwrite`` removes the
  known outputs of an earlier job of the same kind, and only those (other files stay); ``resume`` continues an
  interrupted job from its checkpoint, and is refused for a finished job (whose checkpoint is gone), which would
  otherwise be replaced silently.
"""

from __future__ import annotations

import datetime as _dt
import os
import shutil
import socket
from pathlib import Path

from ..errors import CellvaeInputError

__all__ = ["OutputDir", "LOCK_NAME"]

LOCK_NAME = ".cellvae.lock"


class OutputDir:
    """Check, lock and prepare ``out_dir`` for a job (module docstring); ``with OutputDir(...) as out:`` gives the
    resolved directory and holds the lock for the block.

    Args:
        out_dir: the output directory.
        inputs: input paths, which must not be it or lie in it.
        outputs: the names (files or folders) the job writes in it; ``overwrite`` removes these.
        overwrite: replace the outputs of an earlier job.
        resume: continue an interrupted job from ``out_dir/<checkpoint>``.
        checkpoint: the name of the job's checkpoint folder (None: the job cannot resume).

    Raises:
        CellvaeInputError: on entering: an input inside the directory, a file in its place, no permission to write,
            another job holding the lock, or a non-empty directory without ``overwrite`` or a valid ``resume``.
    """

    def __init__(self, out_dir, inputs: list[Path], outputs: tuple[str, ...], overwrite: bool = False,
                 resume: bool = False, checkpoint: str | None = None):
        self.out = Path(out_dir).expanduser().resolve()
        self.inputs, self.outputs = [Path(p).resolve() for p in inputs], tuple(outputs)
        self.overwrite, self.resume, self.checkpoint = bool(overwrite), bool(resume), checkpoint
        self._fd: int | None = None

    def __enter__(self) -> Path:
        out = self.out
        for p in self.inputs:
            if p == out:
                raise CellvaeInputError(f"--out {str(out)!r} is the input itself; choose another --out.")
            if out in p.parents:
                raise CellvaeInputError(f"The input {str(p)!r} lies in the output directory {str(out)!r}, where it "
                                        "could be overwritten; choose another --out.")
        if out.exists() and not out.is_dir():
            raise CellvaeInputError(f"--out {str(out)!r} exists and is not a directory; choose another --out.")
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise CellvaeInputError(f"Cannot create the output directory {str(out)!r} ({e.strerror or e}); choose "
                                    "another --out.") from e
        if not os.access(out, os.W_OK | os.X_OK):
            raise CellvaeInputError(f"The output directory {str(out)!r} is not writable (permission denied); choose "
                                    "another --out or change its permissions.")
        self._lock()
        try:
            self._prepare()
        except BaseException:
            self._unlock()
            raise
        return out

    def __exit__(self, *exc) -> None:
        self._unlock()

    # -------------------------------------------------------------------------------------------- lock
    def _lock(self) -> None:
        import fcntl

        path = self.out / LOCK_NAME
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise CellvaeInputError(f"Cannot write in the output directory {str(self.out)!r} ({e.strerror or e}); "
                                    "choose another --out.") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 1000).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise CellvaeInputError(
                f"Another cellvae job is writing to {str(self.out)!r} ({holder}). Wait for it to finish, or choose "
                "another --out; two jobs on one directory would overwrite each other's results."
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, (f"PID {os.getpid()} on {socket.gethostname()}, started "
                      f"{_dt.datetime.now().isoformat(timespec='seconds')}").encode())
        self._fd = fd

    def _unlock(self) -> None:
        if self._fd is None:
            return
        try:
            (self.out / LOCK_NAME).unlink()
        except OSError:
            pass
        os.close(self._fd)  # releases the lock
        self._fd = None

    # ----------------------------------------------------------------------------------------- state
    def _prepare(self) -> None:
        out = self.out
        for name in self.outputs:  # an empty folder left by a job that failed early holds nothing to keep
            p = out / name
            if p.is_dir() and not p.is_symlink() and not any(p.iterdir()):
                p.rmdir()
        present = sorted(p.name for p in out.iterdir() if p.name != LOCK_NAME)
        if not present:
            return
        ck = out / self.checkpoint if self.checkpoint else None
        interrupted = ck is not None and ck.is_dir() and any(ck.iterdir())
        ours = [n for n in present if n in self.outputs]
        if self.resume and interrupted:
            return
        if self.resume and not self.overwrite:
            if ours:
                raise CellvaeInputError(
                    f"{str(out)!r} holds a finished job ({', '.join(ours[:4])}), not an interrupted one: --resume "
                    "continues only a job whose checkpoints are still there. Pass --overwrite to replace its "
                    "outputs, or choose another --out."
                )
            raise CellvaeInputError(f"Output directory {str(out)!r} is not empty ({', '.join(present[:4])}) and holds "
                                    "no interrupted cellvae job to resume; choose another --out.")
        if self.overwrite:
            for name in ours:  # the known outputs of an earlier job, and only those
                p = out / name
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p)
                else:
                    p.unlink()
            return
        hint = (" It holds the checkpoints of an interrupted job: pass --resume to continue that job."
                if interrupted else "")
        raise CellvaeInputError(f"Output directory {str(out)!r} exists and is not empty; pass --overwrite to "
                                f"replace the outputs of an earlier job or choose another --out.{hint}")
