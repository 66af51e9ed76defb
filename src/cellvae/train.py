"""One training loop: Adam on the negative ELBO, KL warm-up, early stopping on validation ELBO, best weights,
checkpoints and resume, and guards against non-finite losses and gradients.

The loop touches tensors only (minibatches come from :class:`cellvae.data.TensorData`), accumulates epoch
statistics on tensors, and reads them back once per epoch. On the CPU, a module that takes sparse counts
(``VAEModule.sparse_input``) gets the same minibatches as sparse CSR tensors when the data are sparse enough
(:meth:`cellvae.data.TensorData.iterate_sparse`): the encoder's first layer and the likelihood then cost in
proportion to the non-zero counts (issue 6; same results to float rounding, tests/test_sparse_path.py).

Checkpoints (``checkpoint_dir``): every ``checkpoint_every`` epochs and at the end, ``checkpoint.pt`` holds the
weights, the Adam state, the epoch and step (KL warm-up), the minibatch-order generator and torch's global RNG
(dropout, z samples), the early-stopping state (best weights, best epoch, epochs without improvement) and the
history. It is written to a temporary file in the same directory, flushed and fsynced, renamed over the old one
and the directory fsynced, so the name ``checkpoint.pt`` only ever holds a complete checkpoint; a leftover
temporary file (a crash while writing) is ignored and removed. It holds plain tensors and containers only
(``torch.load(weights_only=True)``). Resuming restores all of it at an epoch boundary, so an interrupted and
resumed run ends with the same weights as an uninterrupted one (on CPU, same seed and thread count). numpy's and
Python's global RNGs are not used by the loop (the cell split is drawn from its own seeded generator).
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from .data import CellvaeInputError, TensorData, minibatch_slices
from .fileio import fsync_dir as _fsync_dir
from .distributed import (
    allreduce_grads,
    allreduce_sum,
    average_buffers,
    broadcast_module,
    is_main,
    per_rank_batch_size,
    resolve_device,
    shard_indices,
    world,
)
from .optim import grads_finite

__all__ = ["TrainingPlan", "train_module", "default_max_epochs", "evaluate_elbo", "kl_weight_at", "torch_threads",
           "default_n_threads", "CellvaeTrainingError", "save_checkpoint", "load_checkpoint", "CHECKPOINT_NAME"]

CHECKPOINT_NAME = "checkpoint.pt"
CHECKPOINT_VERSION = 1
_TMP_PREFIX = f".{CHECKPOINT_NAME}."
_TMP_SUFFIX = ".tmp"
# Test hook: called with the temporary file's path after it is written and fsynced, before the rename
# (tests/crash_train.py uses it to kill a process in the middle of a checkpoint write).
_CHECKPOINT_HOOK: Callable[[Path], None] | None = None
# Settings that must not change on resume (they fix the minibatch order and the cells).
_RESUME_FIXED = ("batch_size", "seed")
# Settings that may change on resume without notice.
_RESUME_FREE = ("max_epochs", "progress_bar", "n_threads", "checkpoint_every", "max_bad_steps", "check_finite",
                "accelerator", "fused_optimizer")


class CellvaeTrainingError(RuntimeError):
    """Training could not go on (repeated non-finite losses or gradients). The message names the likely causes.

    Attributes:
        history: the history up to the failure (per-epoch lists, ``n_skipped_steps``, ``best_epoch``).
    """

    def __init__(self, message: str, history: dict | None = None):
        super().__init__(message)
        self.history = history or {}


def default_n_threads() -> int:
    """Threads for training: half the logical CPUs (at least 1, at most torch's current setting).

    A minibatch step of a VAE with 128 hidden units is made of small matrix products and element-wise kernels
    that gain little from more threads, while OpenMP threads that find their cores busy (a shared machine, two
    jobs at once) spin and can slow a step down a hundredfold. Leaving half the cores free avoids that.
    """
    return max(1, min(torch.get_num_threads(), (os.cpu_count() or 2) // 2))


@contextlib.contextmanager
def torch_threads(n: int | None):
    """Run the block with ``torch.set_num_threads(n)`` (None: :func:`default_n_threads`), then restore."""
    old = torch.get_num_threads()
    torch.set_num_threads(int(n) if n else default_n_threads())
    try:
        yield
    finally:
        torch.set_num_threads(old)


def default_max_epochs(n_cells: int) -> int:
    """Epoch heuristic when ``max_epochs`` is not given: ``min(400, round(20000 / n_cells * 400))``, at least 10
    (the scvi-tools heuristic, with a floor so that very large data still gets a warm-up and a few epochs)."""
    return int(max(10, min(400, round(20000 / max(n_cells, 1) * 400))))


@dataclass
class TrainingPlan:
    """Training settings (defaults as scvi-tools where it has one).

    Attributes:
        max_epochs: number of passes over the training cells.
        batch_size: cells per minibatch (128).
        lr, weight_decay, eps: Adam settings (1e-3, 1e-6, 0.01); ``lr`` is the peak learning rate of a schedule.
        lr_schedule: ``"constant"`` (``lr`` throughout, as scvi-tools) or ``"cosine"``: per step, from ``lr`` down
            to ``COSINE_FLOOR * lr`` at the last step of ``max_epochs`` (cosine annealing without restarts,
            Loshchilov & Hutter 2017, SGDR, eq. 5). The rate is a function of the step alone (:func:`lr_at`), so a
            resumed run follows the uninterrupted one.
        dispersion_lr_multiplier: the learning rate of the likelihood's inverse-dispersion parameter (log theta,
            the module's ``dispersion_parameters()``; scVI's ``px_r``) is ``lr`` times this (its own Adam parameter
            group; the schedule scales both). Adam moves a weight by at most about ``lr`` per step (less when its
            gradients are small next to ``eps``), so at lr 1e-3 log theta needs thousands of steps to go from its
            N(0, 1) start to where the data put it, which is tens of epochs on typical datasets
            (``benchmarks/results/dispersion_lr.md``). ``CountVAE.train`` uses 30.
        n_epochs_kl_warmup: epochs over which the KL weight of z rises linearly (per step) from 0 to 1. None:
            ``max(1, min(400, max_epochs // 2))``, so full weight is reached by the middle of the run whatever
            its length (scvi-tools' fixed 400 epochs never complete in a 100-epoch or a large-data run, which
            leaves it training a beta < 0.25 model with a worse ELBO).
        early_stopping: stop when validation ELBO has not improved by ``early_stopping_min_delta`` nats/cell for
            ``early_stopping_patience`` epochs, counted only after the warm-up; the best weights are restored.
        seed: seeds parameter init noise, dropout, sampling and minibatch order.
        progress_bar: show a tqdm bar with epoch, train and validation ELBO.
        n_threads: torch threads during training (None: :func:`default_n_threads`).
        checkpoint_every: with a checkpoint directory, write a checkpoint every this many epochs (and always
            at the end); a crash loses at most this many epochs.
        max_bad_steps: stop with :class:`CellvaeTrainingError` after this many consecutive minibatches whose
            loss or gradients are not finite (each is skipped: the weights are not updated).
        check_finite: check that the loss and every gradient are finite at every step (the guard above; off only
            to measure its cost).
        max_kl_weight: the KL weight reached at the end of the warm-up and kept afterwards (1.0: the ELBO;
            a beta-VAE's ``beta`` otherwise, Higgins et al. 2017). The validation ELBO used for early stopping is
            always computed with weight 1.
        accelerator: ``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda"``: the device of the training steps.
            The module is moved there for training and back to the CPU at the end (analyses run on the CPU).
        fused_optimizer: use torch's fused Adam when available (about 10 % faster steps on CPU; same update to float
            rounding, see tests/test_fast_path.py).
    """

    max_epochs: int = 400
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 1e-6
    eps: float = 0.01
    lr_schedule: str = "constant"
    n_epochs_kl_warmup: int | None = None
    early_stopping: bool = True
    early_stopping_patience: int = 45
    early_stopping_min_delta: float = 0.0
    seed: int = 0
    progress_bar: bool = True
    n_threads: int | None = None
    checkpoint_every: int = 10
    max_bad_steps: int = 20
    check_finite: bool = True
    max_kl_weight: float = 1.0
    accelerator: str = "auto"
    fused_optimizer: bool = True
    dispersion_lr_multiplier: float = 1.0

    @property
    def warmup_epochs(self) -> int:
        if self.n_epochs_kl_warmup is not None:
            return max(0, int(self.n_epochs_kl_warmup))
        return max(1, min(400, self.max_epochs // 2))


LR_SCHEDULES = ("constant", "cosine")
COSINE_FLOOR = 0.01  # last learning rate of the cosine schedule, relative to the peak


def lr_at(step: int, total_steps: int, plan: TrainingPlan) -> float:
    """Learning rate of optimizer step ``step`` (0-based) out of ``total_steps``, for ``plan.lr_schedule``.

    ``"constant"``: ``plan.lr``. ``"cosine"``: ``lr * (f + (1 - f) * (1 + cos(pi * step / total_steps)) / 2)`` with
    ``f = COSINE_FLOOR``, and ``f * lr`` from ``total_steps`` on (Loshchilov & Hutter 2017, eq. 5, one cycle).

    Raises:
        CellvaeInputError: an unknown ``plan.lr_schedule``.
    """
    if plan.lr_schedule not in LR_SCHEDULES:
        raise CellvaeInputError(f"Unknown lr_schedule {plan.lr_schedule!r}: use one of {', '.join(LR_SCHEDULES)}.")
    if plan.lr_schedule == "constant" or total_steps <= 0:
        return plan.lr
    frac = min(1.0, max(0, step) / total_steps)
    return plan.lr * (COSINE_FLOOR + (1.0 - COSINE_FLOOR) * 0.5 * (1.0 + math.cos(math.pi * frac)))


def kl_weight_at(step: int, warmup_steps: int, max_kl_weight: float = 1.0) -> float:
    """Linear KL warm-up: ``max_kl_weight * min(1, step / warmup_steps)`` (``max_kl_weight`` when there is no
    warm-up). ``max_kl_weight`` is 1 for the ELBO, ``beta`` for a beta-VAE."""
    frac = 1.0 if warmup_steps <= 0 else min(1.0, step / warmup_steps)
    return float(max_kl_weight) * frac


def _to(batch, device: torch.device):
    if device.type == "cpu":
        return batch
    return tuple(t.to(device, non_blocking=True) if t is not None else None for t in batch)


@torch.no_grad()
def evaluate_elbo(module, data: TensorData, indices: torch.Tensor, batch_size: int = 1024) -> dict:
    """Mean ELBO and its parts (nats per cell) over ``indices``, in eval mode, one z sample per cell (from sparse
    minibatches where training uses them, see :func:`train_module`). In a distributed run each rank passes its shard
    of cells and the sums are all-reduced (same value on every rank)."""
    was_training = module.training
    module.eval()
    device = next(module.parameters()).device
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # reconstruction, KL, cells
    minibatches = data.iterate_sparse if _sparse_minibatches(module, data, device) else data.iterate
    for batch in minibatches(indices, batch_size):
        x, cat, cont = _to(batch, device)
        out = module(x, cat, cont, kl_weight=1.0)
        sums[0] += out.reconstruction_loss.sum()
        sums[1] += out.kl_local.sum()
        sums[2] += x.shape[0]
    module.train(was_training)
    sums = allreduce_sum(sums).cpu()
    n = max(float(sums[2]), 1.0)
    r, k = float(sums[0]) / n, float(sums[1]) / n
    return {"elbo": -(r + k), "reconstruction_loss": r, "kl_local": k}


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
        with os.fdopen(fd, "wb") as f:
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
    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
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


# ------------------------------------------------------------------------------------------------ training
def train_module(
    module: torch.nn.Module,
    data: TensorData,
    train_idx: np.ndarray,
    val_idx: np.ndarray,
    plan: TrainingPlan,
    checkpoint_dir: str | os.PathLike | None = None,
    resume: bool = False,
    meta: dict | None = None,
) -> dict:
    """Train ``module`` in place and return its history.

    Args:
        module: a :class:`cellvae.module.VAEModule` (any module whose ``forward(x, cat, cont, kl_weight)``
            returns a ``LossOutput``).
        data: prepared tensors for all cells.
        train_idx, val_idx: integer indices into ``data``; ``val_idx`` may be empty (no early stopping then).
        plan: settings.
        checkpoint_dir: directory for ``checkpoint.pt`` (see the module docstring); None: no checkpoints.
        resume: continue from the checkpoint in ``checkpoint_dir`` (from the start when there is none yet).
            Without it, a directory that already holds a checkpoint is refused.
        meta: plain (JSON-like) description of the model and data, stored in the checkpoint; resuming with a
            different one is refused.

    Returns:
        History dict of per-epoch lists: ``epoch``, ``kl_weight``, ``lr`` (at the epoch's last step), ``train_loss`` (weighted, the optimised
        quantity), ``train_elbo``, ``validation_elbo``, ``validation_reconstruction_loss``,
        ``validation_kl_local`` (nats per cell), ``skipped_steps``, ``seconds``; plus ``best_epoch``,
        ``stopped_early``, ``n_skipped_steps``, ``train_cells_per_second`` and ``resumed_from_epoch`` (0 for a
        fresh run).

    Raises:
        ValueError: if there are fewer training cells than 2 (batch normalisation needs 2).
        CellvaeInputError: a checkpoint that cannot be read or belongs to another model, data or split, or a
            checkpoint directory that already holds one while ``resume`` is False.
        CellvaeTrainingError: ``plan.max_bad_steps`` consecutive non-finite steps; the module then holds the
            best weights so far (or the last finite ones) and, with ``checkpoint_dir``, a checkpoint was written.
    """
    device = resolve_device(plan.accelerator)
    module.to(device)
    try:
        with torch_threads(plan.n_threads):
            return _train(module, data, train_idx, val_idx, plan, checkpoint_dir, resume, meta, device)
    finally:
        module.cpu()


def make_optimizer(params: list[torch.Tensor], plan: TrainingPlan,
                   dispersion: Sequence[torch.Tensor] = ()) -> torch.optim.Adam:
    """Adam with ``plan``'s lr, eps and weight decay; the fused implementation (one kernel over all parameters,
    same arithmetic) where this torch has it for the parameters' device, else the multi-tensor one.

    The parameters of ``params`` that are in ``dispersion`` form a second parameter group (when there are any)
    whose learning rate is ``plan.lr * plan.dispersion_lr_multiplier``; each group holds its factor as
    ``"lr_multiplier"`` (see :func:`set_lr`). Adam is element-wise, so the grouping alone changes no update.
    """
    disp = {id(p) for p in dispersion}
    groups = [{"params": [p for p in params if id(p) not in disp], "lr_multiplier": 1.0}]
    if any(id(p) in disp for p in params):
        groups.append({"params": [p for p in params if id(p) in disp],
                       "lr_multiplier": float(plan.dispersion_lr_multiplier)})
    for g in groups:
        g["lr"] = plan.lr * g["lr_multiplier"]
    kw = {"lr": plan.lr, "eps": plan.eps, "weight_decay": plan.weight_decay}
    if plan.fused_optimizer:
        try:
            return torch.optim.Adam(groups, fused=True, **kw)
        except (RuntimeError, TypeError, ValueError):  # fused Adam not built for this device / dtype
            pass
    return torch.optim.Adam(groups, **kw)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every parameter group's learning rate to ``lr`` times its ``"lr_multiplier"`` (1 if it has none)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_multiplier", 1.0)


def _regroup_old_state(state: dict, params: list, optimizer: torch.optim.Optimizer) -> dict:
    """Optimizer state of a checkpoint written with one parameter group (before the dispersion group), in the
    grouping of ``optimizer``: its parameter ``i`` is ``params[i]``; the moments follow their parameters."""
    if len(state["param_groups"]) != 1 or len(optimizer.param_groups) == 1:
        return state
    old_index = {id(p): i for i, p in enumerate(params)}
    new_groups, new_state, k = [], {}, 0
    for group in optimizer.param_groups:
        ids = []
        for p in group["params"]:
            if old_index[id(p)] in state["state"]:
                new_state[k] = state["state"][old_index[id(p)]]
            ids.append(k)
            k += 1
        new_groups.append({**state["param_groups"][0], "params": ids, "lr_multiplier": group["lr_multiplier"]})
    return {"state": new_state, "param_groups": new_groups}


def _transpose_old_states(optimizer: torch.optim.Optimizer) -> None:
    """Adam moments of a checkpoint written before the first encoder weight became an ``InputMajorLinear``
    parameter ((n_in, n_out) contiguous) are transposed to the parameter's layout. Those moments are (n_out, n_in)
    column-major (as that old parameter): told apart by shape, or by layout when n_in = n_out."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            for k, v in list(state.items()):
                if not (isinstance(v, torch.Tensor) and v.dim() == 2 and p.dim() == 2 and v.shape == p.shape[::-1]):
                    continue
                if v.shape != p.shape or (not v.is_contiguous() and v.t().is_contiguous() and p.is_contiguous()):
                    state[k] = v.t().contiguous()


def _sparse_minibatches(module, data, device: torch.device) -> bool:
    """Whether to feed sparse CSR minibatches (training and validation): a module that takes them
    (``VAEModule.sparse_input``) on the CPU, with data that offer them and are sparse enough
    (``TensorData.sparse_counts``). The cells of each minibatch are the same either way."""
    return (device.type == "cpu" and bool(getattr(module, "sparse_input", False))
            and hasattr(data, "iterate_sparse") and data.sparse_counts() is not None)


def _plan_dict(plan: TrainingPlan) -> dict:
    return {k: getattr(plan, k) for k in plan.__dataclass_fields__}


def _train(module, data: TensorData, train_idx, val_idx, plan: TrainingPlan, checkpoint_dir=None, resume=False,
           meta=None, device: torch.device = torch.device("cpu")) -> dict:
    from tqdm.auto import tqdm

    rank, n_ranks = world()
    if n_ranks > 1 and resume:
        raise CellvaeInputError("Resuming a multi-process run is not supported yet: resume it in one process "
                                "(without --nproc / torchrun), or start over.")

    if len(train_idx) < 2:
        raise ValueError(f"Training needs at least 2 cells, got {len(train_idx)}.")
    if plan.checkpoint_every < 1:
        raise CellvaeInputError(f"checkpoint_every must be at least 1 epoch, got {plan.checkpoint_every}.")
    try:
        multiplier = float(plan.dispersion_lr_multiplier)
    except (TypeError, ValueError):
        multiplier = math.nan
    if isinstance(plan.dispersion_lr_multiplier, bool) or not (math.isfinite(multiplier) and multiplier > 0):
        raise CellvaeInputError("dispersion_lr_multiplier must be a positive number (1: the same learning rate as "
                                f"the other weights), got {plan.dispersion_lr_multiplier!r}.")
    ck_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
    if resume and ck_dir is None:
        raise CellvaeInputError("resume=True needs the checkpoint_dir of the run to continue.")
    ck = None
    if ck_dir is not None:
        ck_dir.mkdir(parents=True, exist_ok=True)
        ck = load_checkpoint(ck_dir)
        if ck is not None and not resume:
            raise CellvaeInputError(
                f"{str(ck_dir)!r} already holds a checkpoint (epoch {ck.get('epoch')}) of an earlier run: pass "
                "resume=True (--resume) to continue it, or use another (or an empty) checkpoint directory."
            )
    meta = meta or {}

    torch.manual_seed(plan.seed + rank)  # dropout and z samples differ between ranks; rank 0 = a 1-process run
    gen = torch.Generator().manual_seed(plan.seed + rank)
    train_all = torch.as_tensor(np.asarray(train_idx), dtype=torch.int64)
    train_t = shard_indices(train_all, plan.seed)
    val_t = shard_indices(torch.as_tensor(np.asarray(val_idx), dtype=torch.int64), plan.seed)
    has_val = len(val_idx) > 0
    if has_val and len(val_t) == 0:
        raise CellvaeInputError(f"{len(val_idx)} validation cells for {world()[1]} processes: each process needs at "
                                "least one. Use a larger train/validation split (train_size) or fewer processes.")
    batch_size = per_rank_batch_size(plan.batch_size)
    broadcast_module(module)

    params = [p for p in module.parameters() if p.requires_grad]
    dispersion = getattr(module, "dispersion_parameters", list)()
    optimizer = make_optimizer(params, plan, dispersion)
    steps_per_epoch = len(minibatch_slices(len(train_t), batch_size))
    warmup_steps = plan.warmup_epochs * steps_per_epoch
    lr_steps = plan.max_epochs * steps_per_epoch  # the cosine schedule ends at the last step of max_epochs
    lr_at(0, lr_steps, plan)  # an unknown schedule fails here, before any work
    keys = ("epoch", "kl_weight", "lr", "train_loss", "train_elbo", "validation_elbo",
            "validation_reconstruction_loss", "validation_kl_local", "skipped_steps", "seconds")
    history: dict = {k: [] for k in keys}
    best_elbo, best_state, best_epoch, bad_epochs = -math.inf, None, -1, 0
    step = 0
    start_epoch = 0
    stopped_early = False
    train_seconds = 0.0
    n_skipped = 0
    if ck is not None:
        _check_resume(ck, plan, train_t, val_t, meta, warmup_steps, ck_dir, lr_steps)
        module.load_state_dict(ck["module"])
        optimizer.load_state_dict(_regroup_old_state(ck["optimizer"], params, optimizer))
        _transpose_old_states(optimizer)
        for group in optimizer.param_groups:  # settings of this call (a lower lr after a failure, say)
            group.update(eps=plan.eps, weight_decay=plan.weight_decay)
        if len(optimizer.param_groups) > 1:
            optimizer.param_groups[1]["lr_multiplier"] = float(plan.dispersion_lr_multiplier)
        set_lr(optimizer, plan.lr)
        gen.set_state(ck["minibatch_rng"])
        torch.set_rng_state(ck["torch_rng"])
        n_done = len(ck["history"].get("epoch", []))  # a checkpoint of an older cellvae may lack a key ("lr")
        history = {k: list(ck["history"].get(k, [math.nan] * n_done)) for k in keys}
        best = ck["best"]
        best_elbo, best_epoch, bad_epochs, best_state = best["elbo"], best["epoch"], best["bad_epochs"], best["state"]
        step, start_epoch = int(ck["step"]), int(ck["epoch"])
        stopped_early = bool(ck["stopped_early"])
        train_seconds = float(ck["train_seconds"])
        n_skipped = int(ck["n_skipped_steps"])

    def checkpoint(epoch_done: int, finished: bool, failed: str | None = None) -> None:
        if ck_dir is None or not is_main():
            return
        save_checkpoint({
            "checkpoint_version": CHECKPOINT_VERSION,
            "epoch": epoch_done, "step": step, "finished": finished, "stopped_early": stopped_early,
            "failed": failed,
            "module": module.state_dict(), "optimizer": optimizer.state_dict(),
            "minibatch_rng": gen.get_state(), "torch_rng": torch.get_rng_state(),
            "best": {"elbo": best_elbo, "epoch": best_epoch, "bad_epochs": bad_epochs, "state": best_state},
            "history": history, "train_seconds": train_seconds, "n_skipped_steps": n_skipped,
            "plan": _plan_dict(plan), "warmup_steps": warmup_steps, "lr_steps": lr_steps,
            "train_idx": train_t, "val_idx": val_t, "meta": meta,
        }, ck_dir)

    # Buffers (batch-norm running statistics) are updated by the forward pass: a skipped step restores them.
    buffers = list(module.buffers())
    buffer_backup = [b.detach().clone() for b in buffers] if plan.check_finite else []

    epochs = range(start_epoch, plan.max_epochs) if not stopped_early else range(0)
    bar = tqdm(epochs, disable=not plan.progress_bar or not is_main(), desc="training", unit="epoch", initial=start_epoch,
               total=plan.max_epochs)
    consecutive_bad = 0
    last_good_step = step
    sparse = _sparse_minibatches(module, data, device)
    if not sparse and hasattr(data, "densify"):  # dense steps select rows of one dense copy, not CSR per batch
        data.densify()
    minibatches = data.iterate_sparse if sparse else data.iterate
    scheduled = plan.lr_schedule != "constant"
    for epoch in bar:
        t0 = time.perf_counter()
        module.train()
        loss_sum = torch.zeros((), device=device)
        elbo_sum = torch.zeros((), device=device)
        n_ok = 0
        skipped = 0
        kl_w = kl_weight_at(step, warmup_steps, plan.max_kl_weight)
        # torchrun: a new split of the training cells between the processes every epoch (as DistributedSampler
        # does), so the len % n_ranks cells left out change; a single process keeps its cells (shard_indices).
        epoch_cells = shard_indices(train_all, plan.seed + epoch) if n_ranks > 1 else train_t
        for batch in minibatches(epoch_cells, batch_size, shuffle=True, generator=gen):
            x, cat, cont = _to(batch, device)
            kl_w = kl_weight_at(step, warmup_steps, plan.max_kl_weight)
            if scheduled:
                set_lr(optimizer, lr_at(step, lr_steps, plan))
            if plan.check_finite:
                for dst, src in zip(buffer_backup, buffers):
                    dst.copy_(src)
            out = module(x, cat, cont, kl_weight=kl_w)
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            mean_loss = allreduce_grads(params, out.loss)  # over ranks: every rank skips the same steps
            bad = None
            if plan.check_finite:  # the loss, then one read of the gradients (cellvae.optim.grads_finite)
                loss_ok = bool(torch.isfinite(mean_loss))
                if not (loss_ok and grads_finite(params)):
                    bad = "gradients" if loss_ok else "loss"
            step += 1
            if bad is None:
                optimizer.step()
                consecutive_bad = 0
                last_good_step = step
                with torch.no_grad():
                    loss_sum += out.loss.detach() * x.shape[0]
                    elbo_sum += out.elbo.detach().sum()
                n_ok += x.shape[0]
                continue
            # Non-finite: no update; undo the batch-norm statistics of this forward pass.
            optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():
                for dst, src in zip(buffers, buffer_backup):
                    dst.copy_(src)
            skipped += 1
            n_skipped += 1
            consecutive_bad += 1
            if consecutive_bad >= plan.max_bad_steps:
                bar.close()
                _fail(module, data, train_t, plan, history, epoch, step, bad, consecutive_bad, n_skipped,
                      best_state, best_epoch, ck_dir, checkpoint, last_good_step)
        average_buffers(module)
        train_seconds += time.perf_counter() - t0
        history["epoch"].append(epoch + 1)
        history["kl_weight"].append(kl_w)
        history["lr"].append(float(optimizer.param_groups[0]["lr"]))
        history["train_loss"].append(loss_sum.item() / n_ok if n_ok else math.nan)
        history["train_elbo"].append(elbo_sum.item() / n_ok if n_ok else math.nan)
        history["skipped_steps"].append(skipped)
        if has_val:
            ev = evaluate_elbo(module, data, val_t)
            history["validation_elbo"].append(ev["elbo"])
            history["validation_reconstruction_loss"].append(ev["reconstruction_loss"])
            history["validation_kl_local"].append(ev["kl_local"])
        history["seconds"].append(time.perf_counter() - t0)
        postfix = {"train_elbo": f"{history['train_elbo'][-1]:.1f}"}
        if has_val:
            postfix["val_elbo"] = f"{history['validation_elbo'][-1]:.1f}"
        bar.set_postfix(postfix, refresh=False)

        # Early stopping and best weights: only once the KL weight is full (the ELBO is the objective then).
        warm = step >= warmup_steps
        if has_val and warm:
            val = history["validation_elbo"][-1]
            if val > best_elbo + plan.early_stopping_min_delta:
                best_elbo, best_epoch, bad_epochs = val, epoch + 1, 0
                best_state = copy.deepcopy(module.state_dict())
            else:
                bad_epochs += 1
            if plan.early_stopping and bad_epochs >= plan.early_stopping_patience:
                stopped_early = True
                break
        if (epoch + 1) % plan.checkpoint_every == 0 and epoch + 1 < plan.max_epochs:
            checkpoint(epoch + 1, finished=False)
    bar.close()
    checkpoint(len(history["epoch"]), finished=True)
    if best_state is not None:
        module.load_state_dict(best_state)
    else:
        best_epoch = len(history["epoch"])
    module.eval()
    history["best_epoch"] = best_epoch
    history["stopped_early"] = stopped_early
    history["n_skipped_steps"] = n_skipped
    history["resumed_from_epoch"] = start_epoch
    n_seen = len(train_t) * n_ranks * len(history["epoch"])
    history["train_cells_per_second"] = n_seen / max(train_seconds, 1e-9)
    return history


def _check_resume(ck: dict, plan: TrainingPlan, train_t, val_t, meta: dict, warmup_steps: int, ck_dir,
                  lr_steps: int = 0) -> None:
    """Refuse a checkpoint of another model, data or split; warn about settings that changed."""
    where = str(ck_dir)
    for key in sorted(set(ck.get("meta", {})) | set(meta)):
        if ck.get("meta", {}).get(key) != meta.get(key):
            raise CellvaeInputError(
                f"The checkpoint in {where!r} was written for another model or data ({key} differs). Resume with "
                "the same data and model settings, or start over in an empty checkpoint directory (without "
                "resume / --resume)."
            )
    old = ck.get("plan", {})
    fixed = [k for k in _RESUME_FIXED if k in old and old[k] != getattr(plan, k)]
    if fixed:
        raise CellvaeInputError(
            "Cannot resume with different " + ", ".join(f"{k} ({old[k]} in the checkpoint, {getattr(plan, k)} now)"
                                                       for k in fixed)
            + ": they fix the cells' split and minibatch order. Use the checkpoint's values or start over without "
            "resume."
        )
    if not (torch.equal(ck["train_idx"], train_t) and torch.equal(ck["val_idx"], val_t)):
        raise CellvaeInputError(
            f"The checkpoint in {where!r} was written for another split of the cells (different cells, train_size "
            "or seed). Resume with the same data and settings, or start over without resume."
        )
    changed = [f"{k}: {old[k]} -> {getattr(plan, k)}" for k in old
               if k not in _RESUME_FIXED + _RESUME_FREE and hasattr(plan, k) and old[k] != getattr(plan, k)]
    if int(ck.get("warmup_steps", warmup_steps)) != warmup_steps:
        changed.append(f"KL warm-up steps: {ck['warmup_steps']} -> {warmup_steps} (set n_epochs_kl_warmup to keep "
                       "it when changing max_epochs)")
    if plan.lr_schedule != "constant" and int(ck.get("lr_steps", lr_steps)) != lr_steps:
        changed.append(f"learning-rate schedule steps: {ck['lr_steps']} -> {lr_steps} (the {plan.lr_schedule} "
                       "schedule ends at max_epochs)")
    if changed:
        warnings.warn("Resuming with changed settings (the result will differ from an uninterrupted run): "
                      + "; ".join(changed), UserWarning, stacklevel=4)


def _fail(module, data, train_t, plan, history, epoch, step, bad, consecutive, n_skipped, best_state, best_epoch,
          ck_dir, checkpoint, last_good_step) -> None:
    """Stop after too many consecutive non-finite steps: keep the best (or last finite) weights, write a
    checkpoint, raise CellvaeTrainingError with the likely causes."""
    history["n_skipped_steps"] = n_skipped
    history["stopped_early"] = False
    data_hint = getattr(data, "failure_hint", None)  # e.g. image data
    if data_hint is None:
        try:
            lib = (data.X.index_select(0, train_t).sum(1).numpy() if data.X is not None
                   else np.asarray(data.csr[train_t.numpy()].sum(1)).ravel())
            lib_text = f"median {np.median(lib):.3g}, max {lib.max():.3g} counts per cell"
        except Exception:  # noqa: BLE001 - only for the message
            lib_text = "see adata.X.sum(1)"
        data_hint = ("data that are not raw counts (pass the raw-count layer, or gene_likelihood='normal' for "
                     f"normalized data), or extreme library sizes ({lib_text}; filter outlier cells)")
    done = len(history["epoch"])
    saved = ""
    if ck_dir is not None:
        checkpoint(done, finished=False, failed=f"{consecutive} consecutive non-finite {bad}")
        saved = f" A checkpoint with these weights was written to {str(ck_dir)!r}."
    if best_state is not None:
        module.load_state_dict(best_state)
        kept = f"The weights of the best epoch so far ({best_epoch}) are kept in the model."
        history["best_epoch"] = best_epoch
    else:
        kept = (f"The model keeps its last finite weights (after update {last_good_step} of {step}; no epoch after "
                "the KL warm-up completed to pick a best one).")
        history["best_epoch"] = 0
    module.eval()
    raise CellvaeTrainingError(
        f"Training stopped in epoch {epoch + 1} (step {step}): {consecutive} consecutive minibatches gave non-finite "
        f"(NaN or inf) {bad}, so the weights were not updated ({n_skipped} minibatches skipped in all). Likely "
        f"causes: a learning rate too high (lr={plan.lr:g}; try 1e-3 or lower), or {data_hint}. {kept}{saved}",
        history,
    )
