"""The optimiser of the training loop: Adam with the inverse dispersion (log theta) in its own parameter group and
learning rate (:func:`make_optimizer`, :func:`set_lr`), the migration of optimizer states of older checkpoints, and the
guard before each step: :func:`grads_finite` tells whether every gradient is finite, in one native read of the
gradients (:func:`cellvae.native.ops.all_finite`), else from their total norm.
"""

from __future__ import annotations

import torch

from ..native import ops
from typing import Sequence

from ..settings import TrainingPlan

__all__ = ["grads_finite", "make_optimizer", "set_lr"]


def grads_finite(params: list[torch.Tensor]) -> bool:
    """Whether every element of the parameters' gradients is finite (parameters without a gradient are skipped).

    One pass over the gradients in the native library for dense contiguous float32 CPU gradients (the sum of
    ``g * 0``, which is 0 exactly when no element is inf or NaN); otherwise the total 2-norm (one fused pass), which
    also counts gradients above ~1e19 (whose squares overflow) as not finite. Synchronises with the device.

    Args:
        params: parameters of any shapes; their ``.grad`` (same shape, or None) is read.

    Returns:
        True when no gradient element is inf or NaN (also when no parameter has a gradient).
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return True
    dense_f32 = all(g.layout == torch.strided and g.dtype == torch.float32 for g in grads)
    if dense_f32 and ops.applies(*grads):
        return ops.all_finite(grads)
    if hasattr(torch.nn.utils, "get_total_norm"):  # torch >= 2.6
        norm = torch.nn.utils.get_total_norm(grads, foreach=True)
    else:  # pragma: no cover
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
    return bool(torch.isfinite(norm))


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


