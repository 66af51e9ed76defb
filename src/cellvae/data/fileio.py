"""Atomic file writes: write to a temporary name in the target's directory, then rename.

A crash or a kill while writing leaves the previous file (or no file) in place, never a half-written one.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from ..errors import CellvaeOutputError

__all__ = ["writing", "write_atomic", "write_h5ad_atomic", "write_text_atomic", "write_synced", "atomic_directory", "fsync_dir", "plain", "safe_name", "zip_damage"]


@contextlib.contextmanager
def writing(path: str | os.PathLike) -> Iterator[None]:
    """Turn a failure to write ``path`` (a full disk, no permission, a writer's own error such as torch's or
    h5py's) into :class:`cellvae.CellvaeOutputError` that names the file, the cause and the free space left.

    Raises:
        CellvaeOutputError: the block raised OSError or RuntimeError.
    """
    try:
        yield
    except (OSError, RuntimeError) as e:
        if isinstance(e, CellvaeOutputError):
            raise
        text = str(e)
        cause = (e.strerror if isinstance(e, OSError) and e.strerror else text).splitlines()[0]
        cause = cause.split(" (file write failed")[0][:200]  # HDF5 appends a long multi-line report
        if ("No space left on device" in text or getattr(e, "errno", None) == 28) and "No space left" not in cause:
            cause += ": no space left on device"
        try:
            free = shutil.disk_usage(Path(path).parent).free
            space = f"; {free / 2**20:.1f} MiB free on that disk"
        except OSError:
            space = ""
        raise CellvaeOutputError(
            f"Could not write {str(path)!r} ({type(e).__name__}: {cause}{space}). Free some space (or fix the "
            "permissions) and run the command again, or write elsewhere; the files that were there before are "
            "unchanged."
        ) from e


def write_atomic(path: str | os.PathLike, writer: Callable[[Path], object]) -> Path:
    """Call ``writer(tmp_path)`` to write a temporary file beside ``path``, then ``os.replace`` it onto ``path``.

    The temporary file is removed if ``writer`` raises. Returns ``path`` as a :class:`~pathlib.Path`.

    Raises:
        CellvaeOutputError: the file cannot be written (a full disk, permissions; :func:`writing`).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with writing(path):
            writer(tmp)
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def write_h5ad_atomic(path: str | os.PathLike, adata) -> Path:
    """``adata.write_h5ad`` (gzip) through :func:`write_atomic`. When HDF5 fails to write (a full disk), h5py reports
    every object it cannot close as an "Exception ignored" traceback; those are held back, and the one
    :class:`cellvae.CellvaeOutputError` names the file and the cause.

    Raises:
        CellvaeOutputError: the file cannot be written.
    """
    import contextlib as _cl
    import io

    held = io.StringIO()  # h5py prints the tracebacks of the objects it cannot close to stderr
    with _cl.redirect_stderr(held):
        try:
            return write_atomic(path, lambda p: adata.write_h5ad(p, compression="gzip"))
        except CellvaeOutputError:
            raise
        except BaseException:
            held.seek(0)
            raise


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return write_atomic(path, lambda p: p.write_text(text, encoding="utf-8"))


def write_synced(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` and fsync the file's contents (for files inside :func:`atomic_directory`, whose
    rename is the atomic step)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def fsync_dir(d: str | os.PathLike) -> None:
    """fsync a directory (its entries: names created or renamed in it); a no-op where directories cannot be opened."""
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:  # e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary directory beside ``target``; when the block ends without error it is fsynced and
    renamed onto ``target`` (an existing ``target`` is moved aside first and deleted afterwards), so readers see
    the old directory or the complete new one, never a mix. On error the temporary directory is removed.

    Raises:
        FileExistsError: ``target`` exists and ``overwrite`` is False.
        CellvaeOutputError: the directory cannot be written (a full disk, permissions; :func:`writing`).
    """
    target = Path(target)
    if target.exists() and not overwrite:
        raise FileExistsError(f"{str(target)!r} exists; pass overwrite=True to replace it.")
    with writing(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    tmp.chmod(0o755)
    try:
        with writing(target):
            yield tmp
        fsync_dir(tmp)
        if target.exists():
            old = target.with_name(f".{target.name}.old{os.getpid()}")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
        fsync_dir(target.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def plain(obj, for_h5ad: bool = False):
    """``obj`` with only plain JSON types: dicts with string keys, lists, str, int, float, bool and None (numpy
    scalars and arrays converted, tuples as lists, non-finite floats as None). With ``for_h5ad`` (for
    ``AnnData.uns``, which cannot hold None): None values are left out, and lists that are not all numbers become
    lists of strings."""
    if isinstance(obj, dict):
        items = ((str(k), plain(v, for_h5ad)) for k, v in obj.items())
        return {k: v for k, v in items if not (for_h5ad and v is None)}
    if isinstance(obj, np.ndarray):
        obj = obj.tolist()
    if isinstance(obj, (list, tuple)):
        vals = [plain(v, for_h5ad) for v in obj]
        if for_h5ad:
            vals = [v for v in vals if v is not None]
            if not all(isinstance(v, (int, float, bool)) for v in vals):
                vals = [str(v) for v in vals]
        return vals
    if isinstance(obj, (np.integer, np.floating, np.bool_)):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def safe_name(name, max_len: int = 80) -> str:
    """``name`` (an obs key, a label, a batch or gene name: anything from the data or the command line) as one
    safe file-name component: characters other than letters, digits, ``.``, ``_`` and ``-`` become ``_``, no
    leading dot, at most ``max_len`` characters (a longer name keeps its start and gains a short hash, so two long
    names stay apart); never empty, never ``.`` or ``..``."""
    import hashlib
    import re

    text = str(name)
    s = re.sub(r"[^A-Za-z0-9._-]", "_", text).lstrip(".") or "_"
    if len(s) > max_len:
        s = f"{s[:max_len - 9]}-{hashlib.sha256(text.encode()).hexdigest()[:8]}"
    return s


def zip_damage(data: bytes) -> str | None:
    """Why a zip archive (``torch.save``'s format) is damaged, or None: a truncated or unreadable archive, or a member
    whose bytes do not match the CRC-32 stored for it (a flipped bit anywhere in the data). torch itself does not
    check the CRCs, so a damaged weight would load as a wrong number. Bytes that are not a zip archive at all give
    None (torch's legacy format; ``torch.load`` then decides)."""
    import io
    import zipfile

    if not data.startswith(b"PK"):
        return None  # not a zip archive (torch's legacy format): torch.load decides
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, RuntimeError) as e:
        return f"not a readable zip archive ({type(e).__name__}: {str(e)[:200]})"
    return None if bad is None else f"the stored checksum (CRC-32) of its member {bad!r} does not match its bytes"
