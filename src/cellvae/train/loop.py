"""One training loop: Adam on the negative ELBO, KL warm-up, early stopping on validation ELBO
(:func:`validation_score`), best weights, checkpoints and resume, and guards against non-finite losses and gradients.

:func:`train_module` runs the stages of :class:`_Run`: set-up (or resume from a checkpoint), then epochs of steps,
then the best weights. The loop touches tensors only (minibatches come from :class:`cellvae.data.CellData`),
accumulates epoch statistics on tensors, and reads them back once per epoch. On the CPU, a module that takes sparse
counts (``VAEModule.sparse_input``) gets the same minibatches as sparse CSR tensors when the data are sparse enough
(:meth:`cellvae.data.TensorData.iterate_sparse`): the encoder's first layer and the likelihood then cost in
proportion to the non-zero counts (same results to float rounding, tests/test_sparse_path.py).

Checkpoints (``checkpoint_dir``): every ``checkpoint_every`` epochs and at the end, ``checkpoint.pt`` holds the
weights, the Adam state, the epoch and step (KL warm-up), the minibatch-order generator and torch's global RNG
(dropout, z samples), the early-stopping state (best weights, best epoch, epochs without improvement), the history
and the settings (:mod:`cellvae.train.checkpoint`). Resuming restores all of it at an epoch boundary, so an
interrupted and resumed run ends with the same weights as an uninterrupted one (on CPU, same seed and thread
count). numpy's and Python's global RNGs are not used by the loop (the cell split is drawn from its own seeded
generator).
"""

from __future__ import annotations

import copy
import math
import os
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from ..data.tensors import CellData, minibatch_slices
from ..errors import CellvaeInputError, CellvaeTrainingError
from ..settings import TrainSettings, as_dict, build, default_max_epochs
from .checkpoint import CHECKPOINT_VERSION, load_checkpoint, save_checkpoint
from .distributed import (allreduce_grads, average_buffers, broadcast_module, is_main, per_rank_batch_size,
                          resolve_device, shard_indices, to_device, world)
from .evaluate import evaluate_elbo, sparse_minibatches
from .device import DeviceData, skip_nonfinite_step
from .optim import _regroup_old_state, _transpose_old_states, grads_finite, make_optimizer, set_lr
from .schedule import dispersion_decay_steps, dispersion_lr_multiplier_at, lr_at, plateau_reductions
from .threads import ThreadTrial, thread_candidates, torch_threads

__all__ = ["kl_weight_at", "train_module", "HISTORY_KEYS"]

# Settings that must not change on resume (they fix the minibatch order and the cells).
_RESUME_FIXED = ("batch_size", "seed", "train_size")
# Settings that may change on resume without notice.
_RESUME_FREE = ("progress_bar", "n_threads", "checkpoint_every", "max_bad_steps", "check_finite",
                "accelerator", "fused_optimizer", "decoder_bias_init", "dispersion_init")
# Settings added to TrainSettings after checkpoints were first written, with the value that reproduces the behaviour
# of a cellvae that did not know them (a checkpoint without the key was trained that way). The "plateau" schedule's
# settings are new with the schedule, so an older run used none of them: their defaults.
_RESUME_LEGACY = {"dispersion_lr_decay": "none",
                  **{k: TrainSettings.__dataclass_fields__[k].default for k in ("lr_factor", "lr_patience", "lr_min")}}
_FORCE_SYNC_FREE = False  # tests: the accelerator's synchronisation-free step on the CPU (tests/test_device.py)
HISTORY_KEYS = ("epoch", "kl_weight", "lr", "train_loss", "train_elbo", "validation_elbo",
                "validation_reconstruction_loss", "validation_kl_local", "skipped_steps", "seconds")
# per-epoch lists that only some modules have (a label classifier: its validation cross-entropy)
OPTIONAL_HISTORY_KEYS = ("validation_classification_loss",)


def validation_score(module: torch.nn.Module, ev: dict) -> float:
    """What early stopping and the best weights maximise: the validation value of the training objective at full
    KL weight, i.e. the ELBO (nats per cell), minus ``module.classification_ratio`` times the class-weighted
    cross-entropy of the label classifier for a module that has one (``ev`` from
    :func:`cellvae.train.evaluate.evaluate_elbo`, with labelled validation cells). Without the second term, a
    classifier trained after a pre-trained VAE (``LabelTransferVAE.from_count_vae``) would be judged by the ELBO
    alone, which it lowers a little while it learns, and its first epoch's weights would be kept."""
    score = float(ev["elbo"])
    if "classification_loss" in ev:
        score -= float(getattr(module, "classification_ratio", 0.0)) * float(ev["classification_loss"])
    return score


def kl_weight_at(step: int, warmup_steps: int, max_kl_weight: float = 1.0) -> float:
    """Linear KL warm-up: ``max_kl_weight * min(1, step / warmup_steps)`` (``max_kl_weight`` when there is no
    warm-up). ``max_kl_weight`` is 1 for the ELBO, ``beta`` for a beta-VAE."""
    frac = 1.0 if warmup_steps <= 0 else min(1.0, step / warmup_steps)
    return float(max_kl_weight) * frac


# ------------------------------------------------------------------------------------------------ training
def train_module(
    module: torch.nn.Module,
    data: CellData,
    train_idx: np.ndarray,
    val_idx: np.ndarray,
    plan: TrainSettings | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    resume: bool = False,
    meta: dict | None = None,
) -> dict:
    """Train ``module`` in place and return its history.

    Args:
        module: a :class:`cellvae.vae.module.VAEModule` (any module whose ``forward(x, cat, cont, kl_weight)``
            returns a ``LossOutput``; its ``beta`` attribute, if any, is the KL weight after the warm-up).
        data: prepared tensors for all cells (:class:`cellvae.data.CellData`).
        train_idx, val_idx: integer indices into ``data``; ``val_idx`` may be empty (no early stopping then).
        plan: a :class:`cellvae.settings.TrainSettings` (None: the defaults); ``max_epochs`` None is resolved by
            :func:`cellvae.settings.default_max_epochs` of the training and validation cells.
        checkpoint_dir: directory for ``checkpoint.pt`` (see the module docstring); None: no checkpoints.
        resume: continue from the checkpoint in ``checkpoint_dir`` (from the start when there is none yet).
            Without it, a directory that already holds a checkpoint is refused.
        meta: plain (JSON-like) description of the model and data, stored in the checkpoint; resuming with a
            different one is refused.

    Returns:
        History dict of per-epoch lists (:data:`HISTORY_KEYS`): ``epoch``, ``kl_weight``, ``lr`` (at the epoch's last
        step), ``train_loss`` (weighted, the optimised quantity), ``train_elbo``, ``validation_elbo``,
        ``validation_reconstruction_loss``, ``validation_kl_local`` (nats per cell), ``skipped_steps``, ``seconds``;
        plus ``best_epoch``, ``stopped_early``, ``n_skipped_steps``, ``train_cells_per_second``,
        ``resumed_from_epoch`` (0 for a fresh run), ``n_threads`` (the threads used at the end; with ``n_threads=None``
        on the CPU they are chosen by timing steps, :class:`cellvae.train.threads.ThreadTrial`, whose trials are in
        ``thread_trials``: ``{count: median step seconds}`` each) and ``plan`` (the settings,
        ``max_epochs`` resolved); a module with a label classifier adds ``validation_classification_loss``
        (:data:`OPTIONAL_HISTORY_KEYS`). Early stopping and the best weights follow :func:`validation_score`.

    Raises:
        ValueError: if there are fewer training cells than 2 (batch normalisation needs 2).
        CellvaeInputError: a checkpoint that cannot be read or belongs to another model, data or split, or a
            checkpoint directory that already holds one while ``resume`` is False.
        CellvaeTrainingError: ``plan.max_bad_steps`` consecutive non-finite steps; the module then holds the
            best weights so far (or the last finite ones) and, with ``checkpoint_dir``, a checkpoint was written.
    """
    plan = build(TrainSettings, plan, None, "plan")
    if plan.max_epochs is None:
        plan = build(TrainSettings, plan, {"max_epochs": default_max_epochs(len(train_idx) + len(val_idx))})
    device = resolve_device(plan.accelerator)
    module.to(device)
    try:
        # n_threads=None on the CPU in one process: the count is chosen by timing steps (ThreadTrial) between the
        # idle cores and the caller's count (read before torch_threads sets the idle-core count)
        candidates = thread_candidates() if plan.n_threads is None and device.type == "cpu" and world()[1] == 1 \
            else []
        with torch_threads(plan.n_threads):
            run = _Run(module, data, train_idx, val_idx, plan, checkpoint_dir, resume, meta, device, candidates)
            history = run.fit()
            history["n_threads"] = torch.get_num_threads()
            if run.thread_trial is not None:
                history["thread_trials"] = [{str(k): v for k, v in t.items()} for t in run.thread_trial.trials]
            return history
    finally:
        module.cpu()


class _Run:
    """The state of one training run and its stages: :meth:`__init__` (set-up, or resume from a checkpoint),
    :meth:`fit` (the epochs), :meth:`epoch` (one pass), :meth:`step` (one minibatch), :meth:`end_of_epoch` (history,
    validation, early stopping, checkpoint)."""

    def __init__(self, module, data, train_idx, val_idx, plan: TrainSettings, checkpoint_dir, resume, meta, device,
                 thread_counts=()):
        self.rank, self.n_ranks = world()
        if self.n_ranks > 1 and resume:
            raise CellvaeInputError("Resuming a multi-process run is not supported yet: resume it in one process "
                                    "(without --nproc / torchrun), or start over.")
        if len(train_idx) < 2:
            raise ValueError(f"Training needs at least 2 cells, got {len(train_idx)}.")
        self.ck_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        if resume and self.ck_dir is None:
            raise CellvaeInputError("resume=True needs the checkpoint_dir of the run to continue.")
        ck = None
        if self.ck_dir is not None:
            self.ck_dir.mkdir(parents=True, exist_ok=True)
            ck = load_checkpoint(self.ck_dir)
            if ck is not None and not resume:
                raise CellvaeInputError(
                    f"{str(self.ck_dir)!r} already holds a checkpoint (epoch {ck.get('epoch')}) of an earlier run: "
                    "pass resume=True (--resume) to continue it, or use another (or an empty) checkpoint directory."
                )
        self.module, self.data, self.plan, self.device = module, data, plan, device
        self.meta = meta or {}
        self.max_kl = float(getattr(module, "beta", 1.0))

        torch.manual_seed(plan.seed + self.rank)  # dropout and z samples differ between ranks; rank 0 = 1 process
        self.gen = torch.Generator().manual_seed(plan.seed + self.rank)
        self.train_all = torch.as_tensor(np.asarray(train_idx), dtype=torch.int64)
        self.train_t = shard_indices(self.train_all, plan.seed)
        self.val_t = shard_indices(torch.as_tensor(np.asarray(val_idx), dtype=torch.int64), plan.seed)
        self.has_val = len(val_idx) > 0
        if plan.lr_schedule == "plateau" and not self.has_val:
            raise CellvaeInputError("lr_schedule='plateau' cuts the learning rate when the validation ELBO stops "
                                    "improving, and this run has no validation cells: use train_size < 1, or "
                                    "lr_schedule='constant'.")
        if self.has_val and len(self.val_t) == 0:
            raise CellvaeInputError(f"{len(val_idx)} validation cells for {self.n_ranks} processes: each process "
                                    "needs at least one. Use a larger train/validation split (train_size) or fewer "
                                    "processes.")
        self.batch_size = per_rank_batch_size(plan.batch_size)
        broadcast_module(module)

        self.params = [p for p in module.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(self.params, plan, getattr(module, "dispersion_parameters", list)())
        steps_per_epoch = len(minibatch_slices(len(self.train_t), self.batch_size))
        self.warmup_steps = plan.warmup_epochs * steps_per_epoch
        self.lr_steps = plan.max_epochs * steps_per_epoch  # the cosine schedule ends at the last step of max_epochs
        lr_at(0, self.lr_steps, plan)  # an unknown schedule fails here, before any work
        self.dispersion_decay_steps = dispersion_decay_steps(plan, self.warmup_steps)
        self.history: dict = {k: [] for k in HISTORY_KEYS}
        self.best_elbo, self.best_state, self.best_epoch, self.bad_epochs = -math.inf, None, -1, 0
        self.step_count, self.start_epoch, self.stopped_early = 0, 0, False
        self.lr_reductions = 0  # cuts of the "plateau" schedule so far (replayed from the history on resume)
        self.train_seconds, self.n_skipped = 0.0, 0
        if ck is not None:
            self._resume(ck)
        # Buffers (batch-norm running statistics) are updated by the forward pass: a skipped step restores them.
        self.buffers = list(module.buffers())
        self.buffer_backup = [b.detach().clone() for b in self.buffers] if plan.check_finite else []
        self.consecutive_bad, self.last_good_step = 0, self.step_count
        sparse = sparse_minibatches(module, data, device)
        if not sparse:  # dense steps select rows of one dense copy, not CSR per batch
            data.densify()
        self.minibatches = data.iterate_sparse if sparse else data.iterate
        self.thread_trial = ThreadTrial(thread_counts) if len(set(thread_counts)) > 1 else None
        on_device = None if sparse else DeviceData.maybe(data, device)  # accelerators: the data copied once
        if on_device is not None:
            self.minibatches = on_device.iterate
        # accelerators: the finiteness check and the skip of a bad step stay on the device (cellvae.train.device)
        self.sync_free = (plan.check_finite and bool(self.optimizer.defaults.get("fused"))
                          and (device.type != "cpu" or _FORCE_SYNC_FREE))
        zero = torch.zeros((), device=device)
        self.dev_ok, self.dev_skipped, self.dev_consecutive = zero.clone(), zero.clone(), zero.clone()

    def _resume(self, ck: dict) -> None:
        """Restore the state of a checkpoint (refused for another model, data or split)."""
        plan, opt = self.plan, self.optimizer
        _check_resume(ck, plan, self.train_t, self.val_t, self.meta, self.warmup_steps, self.ck_dir, self.lr_steps)
        self.module.load_state_dict(ck["module"])
        opt.load_state_dict(_regroup_old_state(ck["optimizer"], self.params, opt))
        _transpose_old_states(opt)
        for group in opt.param_groups:  # settings of this call (a lower lr after a failure, say)
            group.update(eps=plan.eps, weight_decay=plan.weight_decay)
        if len(opt.param_groups) > 1:
            opt.param_groups[1]["lr_multiplier"] = float(plan.dispersion_lr_multiplier)
        set_lr(opt, plan.lr)
        self.gen.set_state(ck["minibatch_rng"])
        torch.set_rng_state(ck["torch_rng"])
        n_done = len(ck["history"].get("epoch", []))  # a checkpoint of an older cellvae may lack a key ("lr")
        self.history = {k: list(ck["history"].get(k, [math.nan] * n_done)) for k in HISTORY_KEYS}
        for k in OPTIONAL_HISTORY_KEYS:
            if k in ck["history"]:
                self.history[k] = list(ck["history"][k])
        best = ck["best"]
        self.best_elbo, self.best_epoch = best["elbo"], best["epoch"]
        self.bad_epochs, self.best_state = best["bad_epochs"], best["state"]
        self.step_count, self.start_epoch = int(ck["step"]), int(ck["epoch"])
        self.stopped_early = bool(ck["stopped_early"])
        self.train_seconds = float(ck["train_seconds"])
        self.n_skipped = int(ck["n_skipped_steps"])
        self.update_lr_reductions()

    def update_lr_reductions(self) -> None:
        """The ``"plateau"`` schedule's cuts after the recorded validation ELBOs (:func:`plateau_reductions`)."""
        if self.plan.lr_schedule == "plateau":
            self.lr_reductions = plateau_reductions(self.history["validation_elbo"], self.plan.lr_patience)

    def checkpoint(self, epoch_done: int, finished: bool, failed: str | None = None) -> None:
        """Write the checkpoint (rank 0, with a checkpoint directory)."""
        if self.ck_dir is None or not is_main():
            return
        save_checkpoint({
            "checkpoint_version": CHECKPOINT_VERSION,
            "epoch": epoch_done, "step": self.step_count, "finished": finished, "stopped_early": self.stopped_early,
            "failed": failed,
            "module": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
            "minibatch_rng": self.gen.get_state(), "torch_rng": torch.get_rng_state(),
            "best": {"elbo": self.best_elbo, "epoch": self.best_epoch, "bad_epochs": self.bad_epochs,
                     "state": self.best_state},
            "history": self.history, "train_seconds": self.train_seconds, "n_skipped_steps": self.n_skipped,
            "plan": as_dict(self.plan), "warmup_steps": self.warmup_steps, "lr_steps": self.lr_steps,
            "train_idx": self.train_t, "val_idx": self.val_t, "meta": self.meta,
        }, self.ck_dir)

    # ------------------------------------------------------------------------------------------ stages
    def fit(self) -> dict:
        """Run the remaining epochs, then keep the best weights; returns the history."""
        from tqdm.auto import tqdm

        plan = self.plan
        epochs = range(self.start_epoch, plan.max_epochs) if not self.stopped_early else range(0)
        self.bar = tqdm(epochs, disable=not plan.progress_bar or not is_main(), desc="training", unit="epoch",
                        initial=self.start_epoch, total=plan.max_epochs)
        for epoch in self.bar:
            stats = self.epoch(epoch)
            if self.end_of_epoch(epoch, *stats):
                break
        self.bar.close()
        self.checkpoint(len(self.history["epoch"]), finished=True)
        if self.best_state is not None:
            self.module.load_state_dict(self.best_state)
        else:
            self.best_epoch = len(self.history["epoch"])
        self.module.eval()
        h = self.history
        h["best_epoch"] = self.best_epoch
        h["stopped_early"] = self.stopped_early
        h["n_skipped_steps"] = self.n_skipped
        h["resumed_from_epoch"] = self.start_epoch
        n_seen = len(self.train_t) * self.n_ranks * len(h["epoch"])
        h["train_cells_per_second"] = n_seen / max(self.train_seconds, 1e-9)
        h["plan"] = as_dict(plan)
        return h

    def epoch(self, epoch: int) -> tuple:
        """One pass over the training cells; returns ``(seconds, kl weight, loss sum, elbo sum, cells, skipped)``."""
        t0 = time.perf_counter()
        self.module.train()
        sums = [torch.zeros((), device=self.device), torch.zeros((), device=self.device)]  # loss, ELBO
        n_ok, skipped = 0, 0
        kl_w = kl_weight_at(self.step_count, self.warmup_steps, self.max_kl)
        # torchrun: a new split of the training cells between the processes every epoch (as DistributedSampler
        # does), so the len % n_ranks cells left out change; a single process keeps its cells (shard_indices).
        cells = shard_indices(self.train_all, self.plan.seed + epoch) if self.n_ranks > 1 else self.train_t
        trial = self.thread_trial
        for batch in self.minibatches(cells, self.batch_size, shuffle=True, generator=self.gen):
            kl_w = kl_weight_at(self.step_count, self.warmup_steps, self.max_kl)
            if trial is not None:
                trial.before_step()
            n = self.step(to_device(batch, self.device), kl_w, sums, epoch)
            if trial is not None:
                trial.after_step()
            n_ok += n
            skipped += n == 0
        if self.sync_free:  # the device-side counts, read once per epoch
            n_ok, skipped = int(self.dev_ok.item()), int(self.dev_skipped.item())
            self.dev_ok.zero_()
            self.dev_skipped.zero_()
            self.n_skipped += skipped
            self.consecutive_bad = int(self.dev_consecutive.item())
            if self.consecutive_bad >= self.plan.max_bad_steps:
                self.bar.close()
                self._fail(epoch, "loss or gradients")
        return t0, kl_w, sums[0], sums[1], n_ok, skipped

    def step(self, batch: tuple, kl_w: float, sums: list, epoch: int) -> int:
        """One minibatch: forward, backward, finiteness check, and an Adam step unless the loss or a gradient is not
        finite (then the batch-norm statistics of the forward pass are undone). Returns the cells it trained on
        (0 for a skipped step)."""
        plan, opt = self.plan, self.optimizer
        x, cat, cont = batch
        decay = self.dispersion_decay_steps > 0 and len(opt.param_groups) > 1
        if decay:  # log theta's multiplier follows its own schedule (cellvae.train.schedule)
            opt.param_groups[1]["lr_multiplier"] = dispersion_lr_multiplier_at(self.step_count,
                                                                               self.dispersion_decay_steps, plan)
        if plan.lr_schedule != "constant" or decay:
            set_lr(opt, lr_at(self.step_count, self.lr_steps, plan, self.lr_reductions))
        if plan.check_finite:
            _copy_all(self.buffer_backup, self.buffers)
        out = self.module(x, cat, cont, kl_weight=kl_w)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        mean_loss = allreduce_grads(self.params, out.loss)  # over ranks: every rank skips the same steps
        if self.sync_free:
            return self._step_on_device(out, mean_loss, x.shape[0], sums)
        bad = None
        if plan.check_finite:  # the loss, then one read of the gradients (cellvae.train.optim.grads_finite)
            loss_ok = bool(torch.isfinite(mean_loss))
            if not (loss_ok and grads_finite(self.params)):
                bad = "gradients" if loss_ok else "loss"
        self.step_count += 1
        if bad is None:
            opt.step()
            self.consecutive_bad = 0
            self.last_good_step = self.step_count
            with torch.no_grad():
                sums[0] += out.loss.detach() * x.shape[0]
                sums[1] += out.elbo.detach().sum()
            return x.shape[0]
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            for dst, src in zip(self.buffers, self.buffer_backup):
                dst.copy_(src)
        self.n_skipped += 1
        self.consecutive_bad += 1
        if self.consecutive_bad >= plan.max_bad_steps:
            self.bar.close()
            self._fail(epoch, bad)
        return 0

    def _step_on_device(self, out, mean_loss: torch.Tensor, n: int, sums: list) -> int:
        """:meth:`step`'s check and update without a host synchronisation (:func:`cellvae.train.device.
        skip_nonfinite_step`); the cells trained on and the skipped steps are counted on the device and read by
        :meth:`epoch`. Returns 0 (the count is the device's)."""
        flag = skip_nonfinite_step(self.optimizer, self.params, mean_loss, self.buffers, self.buffer_backup)
        self.step_count += 1
        with torch.no_grad():
            skip = flag.bool()
            sums[0] += torch.where(skip, torch.zeros_like(flag), out.loss.detach() * n)
            sums[1] += torch.where(skip, torch.zeros_like(flag), out.elbo.detach().sum())
            self.dev_ok += (1.0 - flag) * n
            self.dev_skipped += flag
            self.dev_consecutive.copy_((self.dev_consecutive + flag) * flag)
        return 0

    def end_of_epoch(self, epoch: int, t0: float, kl_w: float, loss_sum, elbo_sum, n_ok: int, skipped: int) -> bool:
        """Record the epoch, evaluate the validation cells, track the best weights and early stopping (only once
        the KL weight is full: the ELBO is the objective then; :func:`validation_score`), write a checkpoint when
        due. Returns whether to stop."""
        plan, h = self.plan, self.history
        average_buffers(self.module)
        self.train_seconds += time.perf_counter() - t0
        h["epoch"].append(epoch + 1)
        h["kl_weight"].append(kl_w)
        h["lr"].append(float(self.optimizer.param_groups[0]["lr"]))
        h["train_loss"].append(loss_sum.item() / n_ok if n_ok else math.nan)
        h["train_elbo"].append(elbo_sum.item() / n_ok if n_ok else math.nan)
        h["skipped_steps"].append(skipped)
        score = None
        if self.has_val:
            ev = evaluate_elbo(self.module, self.data, self.val_t)
            h["validation_elbo"].append(ev["elbo"])
            h["validation_reconstruction_loss"].append(ev["reconstruction_loss"])
            h["validation_kl_local"].append(ev["kl_local"])
            score = validation_score(self.module, ev)
            if "classification_loss" in ev:
                h.setdefault("validation_classification_loss", []).append(ev["classification_loss"])
            self.update_lr_reductions()
        h["seconds"].append(time.perf_counter() - t0)
        postfix = {"train_elbo": f"{h['train_elbo'][-1]:.1f}"}
        if self.has_val:
            postfix["val_elbo"] = f"{h['validation_elbo'][-1]:.1f}"
        self.bar.set_postfix(postfix, refresh=False)

        if score is not None and self.step_count >= self.warmup_steps:
            if score > self.best_elbo + plan.early_stopping_min_delta:
                self.best_elbo, self.best_epoch, self.bad_epochs = score, epoch + 1, 0
                self.best_state = copy.deepcopy(self.module.state_dict())
            else:
                self.bad_epochs += 1
            if plan.early_stopping and self.bad_epochs >= plan.early_stopping_patience:
                self.stopped_early = True
                return True
        if (epoch + 1) % plan.checkpoint_every == 0 and epoch + 1 < plan.max_epochs:
            self.checkpoint(epoch + 1, finished=False)
        return False

    def _fail(self, epoch: int, bad: str) -> None:
        """Stop after too many consecutive non-finite steps: keep the best (or last finite) weights, write a
        checkpoint, raise CellvaeTrainingError with the likely causes."""
        h, module = self.history, self.module
        h["n_skipped_steps"] = self.n_skipped
        h["stopped_early"] = False
        data_hint = getattr(self.data, "failure_hint", None)  # e.g. image data
        if data_hint is None:
            try:
                lib = self.data.row_sums()[self.train_t.numpy()]
                lib_text = f"median {np.median(lib):.3g}, max {lib.max():.3g} counts per cell"
            except Exception:  # noqa: BLE001 - only for the message
                lib_text = "see adata.X.sum(1)"
            data_hint = ("data that are not raw counts (pass the raw-count layer, or gene_likelihood='normal' for "
                         f"normalized data), or extreme library sizes ({lib_text}; filter outlier cells)")
        saved = ""
        consecutive = self.consecutive_bad
        if self.ck_dir is not None:
            self.checkpoint(len(h["epoch"]), finished=False, failed=f"{consecutive} consecutive non-finite {bad}")
            saved = f" A checkpoint with these weights was written to {str(self.ck_dir)!r}."
        if self.best_state is not None:
            module.load_state_dict(self.best_state)
            kept = f"The weights of the best epoch so far ({self.best_epoch}) are kept in the model."
            h["best_epoch"] = self.best_epoch
        else:
            kept = (f"The model keeps its last finite weights (after update {self.last_good_step} of "
                    f"{self.step_count}; no epoch after the KL warm-up completed to pick a best one).")
            h["best_epoch"] = 0
        h["plan"] = as_dict(self.plan)
        module.eval()
        raise CellvaeTrainingError(
            f"Training stopped in epoch {epoch + 1} (step {self.step_count}): {consecutive} consecutive minibatches "
            f"gave non-finite (NaN or inf) {bad}, so the weights were not updated ({self.n_skipped} minibatches "
            f"skipped in all). Likely causes: a learning rate too high (lr={self.plan.lr:g}; try 1e-3 or lower), or "
            f"{data_hint}. {kept}{saved}",
            h,
        )


def _check_resume(ck: dict, plan: TrainSettings, train_t, val_t, meta: dict, warmup_steps: int, ck_dir,
                  lr_steps: int = 0) -> None:
    """Refuse a checkpoint of another model, data or split; warn about settings that changed."""
    where = str(ck_dir)
    keys = sorted(set(ck.get("meta", {})) | set(meta), key=lambda k: (k == "data_fingerprint", k))  # that one last
    for key in keys:
        if key == "data_fingerprint" and ck.get("meta", {}).get(key) != meta.get(key):
            raise CellvaeInputError(
                f"The checkpoint in {where!r} was written for other counts: the data have the same cells and genes "
                "but their values differ (the fingerprint of the counts and covariates changed). Resume with the "
                "data of the interrupted run, or start over without resume (--resume) in an empty directory."
            )
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
    if old:  # settings added after the checkpoint was written: compare with the behaviour it was trained under
        for k in as_dict(plan):
            if k in old or k in _RESUME_FIXED + _RESUME_FREE:
                continue
            if k not in _RESUME_LEGACY:
                changed.append(f"{k}: not recorded in the checkpoint (written by an older cellvae) -> "
                               f"{getattr(plan, k)}")
            elif _RESUME_LEGACY[k] != getattr(plan, k):
                changed.append(f"{k}: {_RESUME_LEGACY[k]} (the behaviour of the older cellvae that wrote the "
                               f"checkpoint) -> {getattr(plan, k)}")
    if int(ck.get("warmup_steps", warmup_steps)) != warmup_steps:
        changed.append(f"KL warm-up steps: {ck['warmup_steps']} -> {warmup_steps} (set n_epochs_kl_warmup to keep "
                       "it when changing max_epochs)")
    if plan.lr_schedule == "cosine" and int(ck.get("lr_steps", lr_steps)) != lr_steps:
        changed.append(f"learning-rate schedule steps: {ck['lr_steps']} -> {lr_steps} (the {plan.lr_schedule} "
                       "schedule ends at max_epochs)")
    if changed:
        warnings.warn("Resuming with changed settings (the result will differ from an uninterrupted run): "
                      + "; ".join(changed), UserWarning, stacklevel=5)


def _copy_all(dst: list[torch.Tensor], src: list[torch.Tensor]) -> None:
    """``d.copy_(s)`` for each pair: one ``torch._foreach_copy_`` call (one dispatched operator instead of one per
    tensor; the module's buffers are copied before every step) where this torch has it."""
    if not dst:
        return
    foreach = getattr(torch, "_foreach_copy_", None)
    if foreach is not None:
        foreach(dst, src)
    else:
        for d, s_ in zip(dst, src):
            d.copy_(s_)
