"""Compile ``fastpath.c`` on first use, cache the library safely, and load it.

``fastpath.c`` holds kernels that PyTorch's eager CPU operators cannot match because they run one element-wise pass
per operator: the fused scVI log-softmax + NB / ZINB log-likelihood with its derivatives, the sparse (CSR) first
encoder layer, batch norm + ReLU + dropout of a hidden layer, the finiteness check of the gradients and totalVI's
protein likelihood with its gradients. Callers reach
them only through :mod:`cellvae.native.ops`, which checks their arguments; all have PyTorch fallbacks that give the
same results (tested to 1e-5 relative; the same dropout masks), so the kernels only make a step faster (about 1.6x on
pbmc4k at one thread).

Compiling. The system C compiler (``$CC``, else ``cc``, ``gcc`` or ``clang``) builds the library for the machine it
runs on (``-march=native``, with 512-bit vectors preferred where the CPU has them: the element-wise kernels are
15-25 % faster than with 256-bit ones on AVX-512 CPUs), once per source, compiler, flags and CPU. Set
``CELLVAE_NATIVE=0`` to use the PyTorch code only, and ``CELLVAE_NATIVE_SANITIZE=1`` to build with
``-fsanitize=address,undefined`` (``make test-native-sanitize``; the process must preload the sanitizer runtimes).

The cache (``$CELLVAE_CACHE_DIR/native``, default ``~/.cache/cellvae/native``):

- a library's file name holds the key of its build (source, compiler, flags, CPU) and the SHA-256 of its own bytes;
  before loading, the bytes are hashed and compared with the name, so a truncated, emptied or altered file is
  never loaded: it is deleted and the library is built again (a damaged library could otherwise crash every later
  run with SIGBUS);
- the compiler writes a temporary file, which is fsynced and then renamed, so concurrent processes (torchrun) never
  load a half-written library; a library that fails to load is deleted and rebuilt once;
- a cache directory that other users can write to is not used (a WARNING says so): the library is built in a private
  per-user folder of the temporary directory instead.

When no compiler is found the PyTorch code is used and the reason is logged at INFO (logger ``cellvae``). When a
compiler is there but the build fails, a WARNING says so and how much slower training will be.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

import torch

__all__ = ["available", "library", "reason_unavailable", "usable", "SLOWDOWN"]

_SOURCE = Path(__file__).resolve().parent / "fastpath.c"
_FLAGS = ["-O3", "-fno-math-errno", "-fno-trapping-math", "-fopenmp-simd", "-fPIC", "-shared"]
_SANITIZE_FLAGS = ["-O1", "-g", "-fno-omit-frame-pointer", "-fsanitize=address,undefined",
                   "-fno-sanitize-recover=undefined", "-fopenmp-simd", "-fPIC", "-shared"]
_ARCH_FLAGS = (["-march=native", "-mprefer-vector-width=512"], ["-march=native"], [])  # tried in this order (x86 first)
# OpenMP threads (the runtime torch loaded, libgomp.so.1; see fastpath.c), else one thread per kernel call
_OPENMP_FLAGS = (["-fopenmp"], [])
SLOWDOWN = 1.6  # training time with the PyTorch code relative to the kernels (pbmc4k, 1 thread, 3 runs each)
_log = logging.getLogger("cellvae")
_state: dict = {}


class CompilerMissing(RuntimeError):
    """No C compiler on this machine: the PyTorch code runs (an INFO message, not a warning)."""


def _cpu_signature() -> str:
    """Machine architecture and the CPU's feature flags (the library is compiled for this CPU)."""
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags = line
                break
    except OSError:
        pass
    return f"{platform.machine()}|{platform.processor()}|{flags}"


def _compiler() -> str | None:
    for cc in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if cc and shutil.which(cc):
            return cc
    return None


def _cache_dir() -> Path:
    root = os.environ.get("CELLVAE_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "cellvae")
    return Path(root) / "native"


def _private_dir() -> Path:
    """A folder of the temporary directory that only this user can write to.

    Raises:
        RuntimeError: it exists and belongs to another user or is writable by others.
    """
    uid = getattr(os, "getuid", lambda: 0)()
    d = Path(tempfile.gettempdir()) / f"cellvae-native-{uid}"
    d.mkdir(mode=0o700, exist_ok=True)
    st = d.stat()
    if hasattr(os, "getuid") and (st.st_uid != uid or st.st_mode & 0o022):
        raise RuntimeError(f"{d} is not a private folder of this user; set CELLVAE_CACHE_DIR")
    return d


def _usable_dir() -> Path:
    """The cache directory, or the private folder when it cannot be made or others can write to it."""
    d = _cache_dir()
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError:  # no writable home
        return _private_dir()
    mode = d.stat().st_mode
    if mode & (stat.S_IWGRP | stat.S_IWOTH):
        _log.warning("cellvae: the native cache %s is writable by other users, so a library found there could have "
                     "been planted; building in a private folder instead (make it private: chmod go-w %s)", d, d)
        return _private_dir()
    return d


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _cached(d: Path, key: str) -> Path | None:
    """The library of ``key`` in ``d`` whose bytes match the SHA-256 in its name; others of that key are removed."""
    found = None
    for p in sorted(d.glob(f"fastpath-{key}-*.so")):
        try:
            ok = found is None and _sha256(p)[:16] == p.stem.rsplit("-", 1)[-1]
        except OSError:
            ok = False
        if ok:
            found = p
            continue
        try:  # damaged (truncated, emptied, altered) or a duplicate: never loaded
            p.unlink()
        except OSError:
            pass
    return found


def _compile(cc: str, flags: list[str], d: Path, key: str) -> tuple[Path | None, str]:
    """Compile into ``d`` (temporary file, fsync, rename to its content-addressed name); (path, "") or (None, error)."""
    fd, tmp = tempfile.mkstemp(prefix=".fastpath-", suffix=".so", dir=d)
    os.close(fd)
    try:
        res = subprocess.run([cc, *flags, "-o", tmp, str(_SOURCE), "-lm"], capture_output=True, text=True,
                             timeout=300)
        if res.returncode != 0:
            return None, res.stderr.strip()[-500:]
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        out = d / f"fastpath-{key}-{_sha256(Path(tmp))[:16]}.so"
        os.replace(tmp, out)
        try:
            dfd = os.open(d, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError:
            pass
        return out, ""
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _build() -> ctypes.CDLL:
    cc = _compiler()
    if cc is None:
        raise CompilerMissing("no C compiler found (set CC, or install gcc / clang)")
    src = _SOURCE.read_bytes()
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60).stdout
    errors = []
    signature = _cpu_signature()
    known_cpu = signature.rsplit("|", 1)[-1] != ""  # without the CPU's flags, a -march=native build is not keyed
    sanitize = os.environ.get("CELLVAE_NATIVE_SANITIZE", "0").strip().lower() in ("1", "true", "yes", "on")
    d = _usable_dir()
    variants = [(arch, omp) for arch in (_ARCH_FLAGS if known_cpu else ([],)) for omp in _OPENMP_FLAGS]
    for arch, omp in variants:
        flags = [*arch, *omp, *(_SANITIZE_FLAGS if sanitize else _FLAGS)]
        key = hashlib.sha256(b"\0".join([src, version.encode(), " ".join(flags).encode(),
                                         signature.encode()])).hexdigest()[:16]
        for attempt in range(2):  # a library that fails to load is deleted and built once more
            out = _cached(d, key)
            if out is None:
                out, err = _compile(cc, flags, d, key)
                if out is None:
                    errors.append(f"{cc} {' '.join(arch)}: {err}")
                    break
            try:
                lib = ctypes.CDLL(str(out))
            except OSError as e:
                errors.append(f"loading {out.name}: {e}")
                out.unlink(missing_ok=True)
                continue
            _declare(lib)
            return lib
    raise RuntimeError("compiling cellvae/native/fastpath.c failed: " + " | ".join(errors))


def _declare(lib: ctypes.CDLL) -> None:
    i64, p = ctypes.c_int64, ctypes.c_void_p
    lib.cv_nb_loglik.argtypes = [i64, i64, i64] + [p] * 16 + [i64]
    lib.cv_nb_loglik.restype = None
    lib.cv_nb_work_size.argtypes = [i64, i64, i64]
    lib.cv_nb_work_size.restype = i64
    lib.cv_csr_linear.argtypes = [i64, i64, p, p, p, p, p, p, i64]
    lib.cv_csr_linear.restype = None
    lib.cv_csr_linear_wgrad.argtypes = [i64, i64, i64, p, p, p, p, p, i64]
    lib.cv_csr_linear_wgrad.restype = None
    lib.cv_all_finite.argtypes = [i64, p, p]
    lib.cv_all_finite.restype = ctypes.c_int32
    d, f, u32 = ctypes.c_double, ctypes.c_float, ctypes.c_uint32
    lib.cv_bn_relu_dropout.argtypes = [i64, i64, p, p, p, d, d, p, p, u32, f, u32, u32, p, p, p, p]
    lib.cv_bn_relu_dropout.restype = None
    lib.cv_bn_relu_dropout_backward.argtypes = [i64, i64, p, p, p, p, p, p, f, p, p, p, p]
    lib.cv_bn_relu_dropout_backward.restype = None
    lib.cv_ln_relu_dropout.argtypes = [i64, i64, p, d, u32, f, u32, u32, p, p, p]
    lib.cv_ln_relu_dropout.restype = None
    lib.cv_ln_relu_dropout_backward.argtypes = [i64, i64, p, p, p, p, p, f, p]
    lib.cv_ln_relu_dropout_backward.restype = None
    lib.cv_dropout_keep.argtypes = [i64, u32, u32, u32, p]
    lib.cv_dropout_keep.restype = None
    lib.cv_csr_check.argtypes = [i64, i64, i64, p, p, p]
    lib.cv_csr_check.restype = ctypes.c_int32
    lib.cv_protein_mixture.argtypes = [i64, i64, i64, i64] + [p] * 8 + [d] + [p] * 4
    lib.cv_protein_mixture.restype = ctypes.c_int32
    lib.cv_protein_mixture_backward.argtypes = [i64, i64, i64, i64] + [p] * 9
    lib.cv_protein_mixture_backward.restype = ctypes.c_int32
    lib.cv_joint_split.argtypes = [i64, i64, i64, i64, p, p, p, p, i64, p, ctypes.c_int32] + [p] * 8
    lib.cv_joint_split.restype = ctypes.c_int32


def library() -> ctypes.CDLL | None:
    """The compiled kernels (built on the first call), or None when disabled (``CELLVAE_NATIVE=0``) or when they
    cannot be built (see :func:`reason_unavailable`). Only :mod:`cellvae.native.ops` calls into it."""
    if "lib" not in _state:
        if os.environ.get("CELLVAE_NATIVE", "1").strip().lower() in ("0", "false", "no", "off"):
            _state.update(lib=None, reason="disabled by CELLVAE_NATIVE=0")
        else:
            try:
                _state.update(lib=_build(), reason=None)
            except CompilerMissing as e:
                _state.update(lib=None, reason=f"{type(e).__name__}: {e}")
                _log.info("cellvae native kernels unavailable, using the PyTorch code: %s", _state["reason"])
            except Exception as e:  # noqa: BLE001 - any failure means the PyTorch fallback, never a broken training
                _state.update(lib=None, reason=f"{type(e).__name__}: {e}")
                _log.warning("cellvae: building the native kernels failed although a C compiler is installed, so "
                             "training runs the PyTorch code and takes about %.1f times as long. Cause: %s",
                             SLOWDOWN, _state["reason"])
    return _state["lib"]


def available() -> bool:
    """Whether the native kernels can be used in this process."""
    return library() is not None


def reason_unavailable() -> str | None:
    """Why :func:`library` is None (None when the kernels are available)."""
    library()
    return _state["reason"]


def usable(*tensors: torch.Tensor | None) -> bool:
    """Whether the kernels apply to these tensors: native library present, and every tensor on the CPU,
    contiguous, and float32 (int64 index tensors are accepted as they are)."""
    for t in tensors:
        if t is None:
            continue
        if t.device.type != "cpu" or not t.is_contiguous() or t.dtype not in (torch.float32, torch.int64):
            return False
    return library() is not None  # compiled only once a CPU tensor asks for it (not on GPU runs)
