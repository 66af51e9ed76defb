"""Optional native (C) kernels for the CPU training step, compiled on first use.

``csrc/fastpath.c`` holds kernels that PyTorch's eager CPU operators cannot match because they run one
element-wise pass per operator: the fused scVI log-softmax + NB / ZINB log-likelihood with its derivatives
(:func:`cellvae.distributions.softmax_count_log_prob_sum`), the sparse (CSR) first encoder layer
(:func:`cellvae.nn.sparse_linear`), batch norm + ReLU + dropout of a hidden layer (:func:`cellvae.nn.bn_relu_dropout`)
and the finiteness check of the gradients (:func:`cellvae.optim.grads_finite`). All have PyTorch fallbacks that give
the same results (tested to 1e-5 relative; the same dropout masks); the kernels only make a step faster.

The C file is compiled with the system C compiler (``$CC``, else ``cc`` or ``gcc``) into
``$CELLVAE_CACHE_DIR/native`` (default ``~/.cache/cellvae/native``; a folder in the temporary directory when that
cannot be created), once per source, compiler and CPU: the
library is built for the machine it runs on (``-march=native``, with 512-bit vectors preferred where the CPU has
them: the element-wise kernels are 15-25 % faster than with 256-bit ones on AVX-512 CPUs), so its file name includes a hash of the CPU's
flags. The compiled file is written to a temporary name and renamed, so concurrent processes (torchrun) never load
a half-written library. Set ``CELLVAE_NATIVE=0`` to use the PyTorch code only. When no compiler is found or the
build fails, the PyTorch code is used and the reason is logged once (logger ``cellvae``, level INFO).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

__all__ = ["available", "library", "reason_unavailable", "usable", "csr_parts", "ptr"]

_SOURCE = Path(__file__).resolve().parent / "fastpath.c"
_FLAGS = ["-O3", "-fno-math-errno", "-fno-trapping-math", "-fopenmp-simd", "-fPIC", "-shared"]
_ARCH_FLAGS = (["-march=native", "-mprefer-vector-width=512"], ["-march=native"], [])  # tried in this order (x86 first)
_log = logging.getLogger("cellvae")
_state: dict = {}


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


def _build() -> ctypes.CDLL:
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set CC, or install gcc / clang)")
    src = _SOURCE.read_bytes()
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60).stdout
    errors = []
    signature = _cpu_signature()
    known_cpu = signature.rsplit("|", 1)[-1] != ""  # without the CPU's flags, a -march=native build is not keyed
    for arch in (_ARCH_FLAGS if known_cpu else ([],)):
        flags = [*arch, *_FLAGS]
        key = hashlib.sha256(b"\0".join([src, version.encode(), " ".join(flags).encode(),
                                         signature.encode()])).hexdigest()[:16]
        out = _cache_dir() / f"fastpath-{key}.so"
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
        except OSError:  # no writable home: a private per-user folder in the temporary directory
            uid = getattr(os, "getuid", lambda: 0)()
            out = Path(tempfile.gettempdir()) / f"cellvae-native-{uid}" / out.name
            out.parent.mkdir(mode=0o700, exist_ok=True)
            st = out.parent.stat()
            if hasattr(os, "getuid") and (st.st_uid != uid or st.st_mode & 0o022):
                raise RuntimeError(f"{out.parent} is not a private folder of this user; set CELLVAE_CACHE_DIR")
        if not out.exists():
            fd, tmp = tempfile.mkstemp(prefix=".fastpath-", suffix=".so", dir=out.parent)
            os.close(fd)
            try:
                res = subprocess.run([cc, *flags, "-o", tmp, str(_SOURCE), "-lm"], capture_output=True, text=True,
                                     timeout=300)
                if res.returncode != 0:
                    errors.append(f"{cc} {' '.join(arch)}: {res.stderr.strip()[-500:]}")
                    continue
                os.replace(tmp, out)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        lib = ctypes.CDLL(str(out))
        _declare(lib)
        return lib
    raise RuntimeError("compiling cellvae/csrc/fastpath.c failed: " + " | ".join(errors))


def _declare(lib: ctypes.CDLL) -> None:
    i64, p = ctypes.c_int64, ctypes.c_void_p
    lib.cv_nb_loglik.argtypes = [i64, i64, i64] + [p] * 16
    lib.cv_nb_loglik.restype = None
    lib.cv_nb_work_size.argtypes = [i64, i64]
    lib.cv_nb_work_size.restype = i64
    lib.cv_csr_linear.argtypes = [i64, i64, p, p, p, p, p, p]
    lib.cv_csr_linear.restype = None
    lib.cv_csr_linear_wgrad.argtypes = [i64, i64, i64, p, p, p, p, p]
    lib.cv_csr_linear_wgrad.restype = None
    lib.cv_all_finite.argtypes = [i64, p, p]
    lib.cv_all_finite.restype = ctypes.c_int32
    d, f, u32 = ctypes.c_double, ctypes.c_float, ctypes.c_uint32
    lib.cv_bn_relu_dropout.argtypes = [i64, i64, p, p, p, d, d, p, p, u32, f, u32, u32, p, p, p, p]
    lib.cv_bn_relu_dropout.restype = None
    lib.cv_bn_relu_dropout_backward.argtypes = [i64, i64, p, p, p, p, p, p, f, p, p, p, p]
    lib.cv_bn_relu_dropout_backward.restype = None
    lib.cv_dropout_keep.argtypes = [i64, u32, u32, u32, p]
    lib.cv_dropout_keep.restype = None


def library() -> ctypes.CDLL | None:
    """The compiled kernels (built on the first call), or None when disabled (``CELLVAE_NATIVE=0``) or when they
    cannot be built (see :func:`reason_unavailable`)."""
    if "lib" not in _state:
        if os.environ.get("CELLVAE_NATIVE", "1").strip().lower() in ("0", "false", "no", "off"):
            _state.update(lib=None, reason="disabled by CELLVAE_NATIVE=0")
        else:
            try:
                _state.update(lib=_build(), reason=None)
            except Exception as e:  # any failure means the PyTorch fallback, never a broken training
                _state.update(lib=None, reason=f"{type(e).__name__}: {e}")
                _log.info("cellvae native kernels unavailable, using the PyTorch code: %s", _state["reason"])
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


def csr_parts(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(crow, col, values)`` of a sparse CSR tensor with int64 indices, as the kernels take them (int32 indices
    are converted: a copy; the training minibatches already come with int64 indices)."""
    return x.crow_indices().long(), x.col_indices().long(), x.values()


def ptr(t: torch.Tensor | None) -> int | None:
    """Data pointer of a tensor for a ctypes call (None for None)."""
    return None if t is None else t.data_ptr()
