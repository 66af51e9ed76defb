"""One training loop: Adam on the negative ELBO, KL warm-up, early stopping on validation ELBO, best weights.

The loop touches tensors only (minibatches come from :class:`cellvae.data.TensorData`), accumulates epoch
statistics on tensors, and reads them back once per epoch.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import time
from dataclasses import dataclass

import numpy as np
import torch

from .data import TensorData, minibatch_slices

__all__ = ["TrainingPlan", "train_module", "default_max_epochs", "evaluate_elbo", "kl_weight_at", "torch_threads",
           "default_n_threads"]


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
        lr, weight_decay, eps: Adam settings (1e-3, 1e-6, 0.01).
        n_epochs_kl_warmup: epochs over which the KL weight of z rises linearly (per step) from 0 to 1. None:
            ``max(1, min(400, max_epochs // 2))``, so full weight is reached by the middle of the run whatever
            its length (scvi-tools' fixed 400 epochs never complete in a 100-epoch or a large-data run, which
            leaves it training a beta < 0.25 model with a worse ELBO).
        early_stopping: stop when validation ELBO has not improved by ``early_stopping_min_delta`` nats/cell for
            ``early_stopping_patience`` epochs, counted only after the warm-up; the best weights are restored.
        seed: seeds parameter init noise, dropout, sampling and minibatch order.
        progress_bar: show a tqdm bar with epoch, train and validation ELBO.
        n_threads: torch threads during training (None: :func:`default_n_threads`).
    """

    max_epochs: int = 400
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 1e-6
    eps: float = 0.01
    n_epochs_kl_warmup: int | None = None
    early_stopping: bool = True
    early_stopping_patience: int = 45
    early_stopping_min_delta: float = 0.0
    seed: int = 0
    progress_bar: bool = True
    n_threads: int | None = None

    @property
    def warmup_epochs(self) -> int:
        if self.n_epochs_kl_warmup is not None:
            return max(0, int(self.n_epochs_kl_warmup))
        return max(1, min(400, self.max_epochs // 2))


def kl_weight_at(step: int, warmup_steps: int) -> float:
    """Linear KL warm-up: ``min(1, step / warmup_steps)`` (1 when there is no warm-up)."""
    return 1.0 if warmup_steps <= 0 else min(1.0, step / warmup_steps)


@torch.no_grad()
def evaluate_elbo(module, data: TensorData, indices: torch.Tensor, batch_size: int = 1024) -> dict:
    """Mean ELBO and its parts (nats per cell) over ``indices``, in eval mode, one z sample per cell."""
    was_training = module.training
    module.eval()
    recon = torch.zeros(())
    kl = torch.zeros(())
    n = 0
    for x, cat, cont in data.iterate(indices, batch_size):
        out = module(x, cat, cont, kl_weight=1.0)
        recon += out.reconstruction_loss.sum()
        kl += out.kl_local.sum()
        n += x.shape[0]
    module.train(was_training)
    n = max(n, 1)
    r, k = recon.item() / n, kl.item() / n
    return {"elbo": -(r + k), "reconstruction_loss": r, "kl_local": k}


def train_module(
    module: torch.nn.Module,
    data: TensorData,
    train_idx: np.ndarray,
    val_idx: np.ndarray,
    plan: TrainingPlan,
) -> dict:
    """Train ``module`` in place and return its history.

    Args:
        module: a :class:`cellvae.module.VAEModule` (any module whose ``forward(x, cat, cont, kl_weight)``
            returns a ``LossOutput``).
        data: prepared tensors for all cells.
        train_idx, val_idx: integer indices into ``data``; ``val_idx`` may be empty (no early stopping then).
        plan: settings.

    Returns:
        History dict of per-epoch lists: ``epoch``, ``kl_weight``, ``train_loss`` (weighted, the optimised
        quantity), ``train_elbo``, ``validation_elbo``, ``validation_reconstruction_loss``,
        ``validation_kl_local`` (nats per cell), ``seconds``; plus ``best_epoch``, ``stopped_early``,
        ``train_cells_per_second``.

    Raises:
        ValueError: if there are fewer training cells than 2 (batch normalisation needs 2).
    """
    with torch_threads(plan.n_threads):
        return _train(module, data, train_idx, val_idx, plan)


def _train(module, data: TensorData, train_idx, val_idx, plan: TrainingPlan) -> dict:
    from tqdm.auto import tqdm

    if len(train_idx) < 2:
        raise ValueError(f"Training needs at least 2 cells, got {len(train_idx)}.")
    torch.manual_seed(plan.seed)
    gen = torch.Generator().manual_seed(plan.seed)
    train_t = torch.as_tensor(train_idx, dtype=torch.int64)
    val_t = torch.as_tensor(val_idx, dtype=torch.int64)
    has_val = len(val_t) > 0

    optimizer = torch.optim.Adam(
        [p for p in module.parameters() if p.requires_grad],
        lr=plan.lr, eps=plan.eps, weight_decay=plan.weight_decay,
    )
    steps_per_epoch = len(minibatch_slices(len(train_t), plan.batch_size))
    warmup_steps = plan.warmup_epochs * steps_per_epoch
    keys = ("epoch", "kl_weight", "train_loss", "train_elbo", "validation_elbo",
            "validation_reconstruction_loss", "validation_kl_local", "seconds")
    history: dict = {k: [] for k in keys}
    best_elbo, best_state, best_epoch, bad_epochs = -math.inf, None, -1, 0
    step = 0
    stopped_early = False
    train_seconds = 0.0

    bar = tqdm(range(plan.max_epochs), disable=not plan.progress_bar, desc="training", unit="epoch")
    for epoch in bar:
        t0 = time.perf_counter()
        module.train()
        loss_sum = torch.zeros(())
        elbo_sum = torch.zeros(())
        kl_w = kl_weight_at(step, warmup_steps)
        for x, cat, cont in data.iterate(train_t, plan.batch_size, shuffle=True, generator=gen):
            kl_w = kl_weight_at(step, warmup_steps)
            out = module(x, cat, cont, kl_weight=kl_w)
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            optimizer.step()
            step += 1
            with torch.no_grad():
                loss_sum += out.loss.detach() * x.shape[0]
                elbo_sum += out.elbo.detach().sum()
        train_seconds += time.perf_counter() - t0
        n_train = len(train_t)
        history["epoch"].append(epoch + 1)
        history["kl_weight"].append(kl_w)
        history["train_loss"].append(loss_sum.item() / n_train)
        history["train_elbo"].append(elbo_sum.item() / n_train)
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
    bar.close()
    if best_state is not None:
        module.load_state_dict(best_state)
    else:
        best_epoch = len(history["epoch"])
    module.eval()
    history["best_epoch"] = best_epoch
    history["stopped_early"] = stopped_early
    n_seen = len(train_t) * len(history["epoch"])
    history["train_cells_per_second"] = n_seen / max(train_seconds, 1e-9)
    return history
