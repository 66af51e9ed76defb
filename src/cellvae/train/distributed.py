"""Multi-process data-parallel training with ``torch.distributed`` (launched by ``torchrun``), and device choice.

How a run works (see :func:`cellvae.train.train_module`):

- ``torchrun --nproc_per_node N ...`` (or ``cellvae fit --nproc N``, which calls it) starts N processes with
  ``RANK``/``WORLD_SIZE``/``MASTER_ADDR`` in their environment; :func:`init_from_env` joins them into one process
  group (``gloo`` on CPU, ``nccl`` on CUDA).
- Every rank builds the same model from the same seed; rank 0's parameters and buffers are broadcast so that all
  start identical. The training cells are split into N equal shards (a seeded permutation; at most N - 1 cells
  are left out per epoch so that every rank runs the same number of steps), each rank shuffles its own shard every
  epoch and uses minibatches of ``ceil(batch_size / N)`` cells, so one optimisation step sees about
  ``batch_size`` cells in all, as in single-process training.
- After each backward pass the gradients are averaged over ranks with one all-reduce of a flat buffer, so every
  rank applies the same update (and the non-finite guard decides the same on every rank). Batch-norm running
  statistics are averaged at the end of every epoch.
- The validation cells are sharded too; the sums of the ELBO parts are all-reduced, so every rank sees the same
  validation ELBO and early stopping stops all ranks at the same epoch.
- Only rank 0 writes checkpoints and outputs.

Multi-node: run the same ``torchrun`` command on every node with ``--nnodes M --node-rank I --rdzv-backend c10d
--rdzv-endpoint HOST:PORT`` (see README).
"""

from __future__ import annotations

import functools
import inspect
import math
import os

import torch

from ..settings import ACCELERATORS
import torch.distributed as dist

__all__ = ["world", "is_main", "init_from_env", "shutdown", "with_process_group", "resolve_device", "shard_indices", "allreduce_grads",
           "allreduce_sum", "average_buffers", "broadcast_module", "barrier", "per_rank_batch_size", "to_device"]



def world() -> tuple[int, int]:
    """``(rank, world_size)``; ``(0, 1)`` when no process group is initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    """True on rank 0 (and in single-process runs): the process that writes outputs."""
    return world()[0] == 0


def resolve_device(accelerator: str = "auto") -> torch.device:
    """``"auto"``: CUDA when available (this rank's ``LOCAL_RANK`` GPU), else CPU; ``"cpu"``; ``"cuda"``.

    Raises:
        ValueError: an unknown accelerator, or ``"cuda"`` without a CUDA device.
    """
    if accelerator not in ACCELERATORS:
        raise ValueError(f"accelerator must be one of {ACCELERATORS}, got {accelerator!r}.")
    if accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError("accelerator='cuda' but torch sees no CUDA device (torch.cuda.is_available() is False); "
                         "use accelerator='cpu' or 'auto', or install a CUDA build of torch.")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())


def init_from_env(accelerator: str = "auto") -> bool:
    """Join the process group described by torchrun's environment (``WORLD_SIZE`` > 1); no-op otherwise or when
    already initialised. Returns True when running distributed. On CUDA each process first selects its own GPU
    (``LOCAL_RANK``), so that NCCL collectives (the first barrier included) never all run on GPU 0.

    Raises:
        ValueError: as :func:`resolve_device`; and the errors of ``torch.distributed.init_process_group``.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if not dist.is_initialized():
        device = resolve_device(accelerator)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return True


def shutdown() -> None:
    """Leave the process group (if any)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def with_process_group(fn):
    """Decorate a job function with an ``accelerator`` parameter: join torchrun's process group (if any, see
    :func:`init_from_env`) before it runs and leave it afterwards, also when it raises."""
    sig = inspect.signature(fn)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        bound = sig.bind(*args, **kwargs)
        bound.apply_defaults()
        distributed = init_from_env(bound.arguments.get("accelerator", "auto"))
        try:
            return fn(*args, **kwargs)
        finally:
            if distributed:
                shutdown()

    return wrapper


def barrier() -> None:
    """Wait for every rank (a no-op in a single process)."""
    if world()[1] > 1:
        dist.barrier()


def shard_indices(indices: torch.Tensor, seed: int) -> torch.Tensor:
    """This rank's equal share of ``indices`` (a seeded permutation, identical on all ranks, cut into
    ``world_size`` parts of ``len // world_size``); all of them in a single process."""
    rank, size = world()
    if size == 1:
        return indices
    perm = torch.randperm(len(indices), generator=torch.Generator().manual_seed(int(seed) + 7919))
    per = len(indices) // size
    return indices[perm[rank * per:(rank + 1) * per]].sort().values


def per_rank_batch_size(batch_size: int) -> int:
    """Minibatch size per rank so that one step covers about ``batch_size`` cells over all ranks (at least 2)."""
    return max(2, math.ceil(batch_size / world()[1]))


def broadcast_module(module: torch.nn.Module) -> None:
    """Copy rank 0's parameters and buffers to every rank."""
    if world()[1] == 1:
        return
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, src=0)


def allreduce_grads(params: list[torch.Tensor], loss: torch.Tensor | None = None) -> torch.Tensor | None:
    """Average the gradients over ranks in place (one all-reduce of a flat buffer). Parameters without a gradient
    are the same on every rank (same model, same code path) and are skipped.

    ``loss`` (a scalar) rides in the same buffer and its mean over ranks is returned (``loss`` itself in a single
    process): non-finite on every rank when it is on any, so that every rank skips the same steps.
    """
    size = world()[1]
    if size == 1:
        return loss
    grads = [p.grad for p in params if p.grad is not None]
    extra = [] if loss is None else [loss.detach().reshape(1).to(grads[0].dtype if grads else torch.float32)]
    if not grads and not extra:
        return loss
    flat = torch.cat([g.reshape(-1) for g in grads] + extra)
    dist.all_reduce(flat)
    flat /= size
    offset = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[offset:offset + n].view_as(g))
        offset += n
    return flat[-1] if extra else None


def allreduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of ``t`` over ranks (a new tensor; ``t`` itself in a single process)."""
    if world()[1] == 1:
        return t
    t = t.clone()
    dist.all_reduce(t)
    return t


def average_buffers(module: torch.nn.Module) -> None:
    """Average floating-point buffers (batch-norm running mean and variance) over ranks."""
    size = world()[1]
    if size == 1:
        return
    with torch.no_grad():
        for b in module.buffers():
            if b.is_floating_point():
                dist.all_reduce(b)
                b /= size


def to_device(batch: tuple, device: torch.device) -> tuple:
    """A minibatch ``(x, cat, cont)`` on ``device`` (None entries kept; unchanged on the CPU)."""
    if device.type == "cpu":
        return batch
    return tuple(t.to(device, non_blocking=True) if t is not None else None for t in batch)
