"""Neural-network building blocks: fully connected layers with covariate injection, encoders and decoders.

Covariates are injected as in scVI (Lopez et al. 2018): every hidden layer receives the one-hot categorical
covariates and the continuous covariates next to its input. A one-hot vector times a weight matrix is a row
lookup, so :class:`CovariateLinear` adds an embedding row per categorical covariate instead of concatenating
one-hot columns: the same function, without building one-hot tensors in the training step.
"""

from __future__ import annotations

from typing import Sequence

import scipy.sparse as sp
import torch
from torch import nn

from ..data.sparse import check_csr_tensor, csr_parts
from ..native import ops

__all__ = ["CovariateLinear", "FCLayers", "Encoder", "DecoderSCVI", "LinearDecoderSCVI", "sparse_linear",
           "bn_relu_dropout", "ln_relu_dropout", "dropout_keep"]


class _SparseLinear(torch.autograd.Function):
    """``x W^T + b`` for a sparse CSR ``x`` (n, n_in) that needs no gradient: the forward product and the weight
    gradient ``g^T x = (x^T g)^T`` are sparse-dense products (work proportional to the non-zeros of ``x``). On the
    CPU both come from the native kernels of :mod:`cellvae.native` when available; otherwise the weight gradient
    comes from scipy (``x^T`` is then a free CSC view), as an (n_in, n_out) row-major array
    whose transpose has the layout of the first encoder weight (see :class:`InputMajorLinear`)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.x = x
        wt = weight.t()
        if x.dim() == 2 and x.shape[1] == wt.shape[0] and _native_csr(x, wt, bias):  # else torch raises
            crow, col, val = ctx.parts = csr_parts(x)
            return ops.csr_linear(crow, col, val, wt, bias)  # checks the CSR structure
        check_csr_tensor(x)
        out = x @ wt
        return out + bias if bias is not None else out

    @staticmethod
    def backward(ctx, grad):
        x = ctx.x
        dw = db = None
        if ctx.needs_input_grad[1]:
            grad = grad.contiguous()
            if _native_csr(x, grad):
                crow, col, val = getattr(ctx, "parts", None) or csr_parts(x)
                dw = ops.csr_linear_wgrad(crow, col, val, grad, x.shape[1]).t()
            elif x.device.type == "cpu":
                m = sp.csr_matrix((x.values().numpy(), x.col_indices().numpy(), x.crow_indices().numpy()),
                                  shape=x.shape)
                dw = torch.from_numpy(m.T @ grad.numpy()).t()
            else:
                dw = grad.t() @ x.to_dense()
        if ctx.needs_input_grad[2]:
            db = grad.sum(0)
        return None, dw, db


def _native_csr(x: torch.Tensor, *dense: torch.Tensor | None) -> bool:
    """Whether the native CSR kernels of :mod:`cellvae.native.ops` apply (float32 CPU tensors)."""
    return (x.dtype == torch.float32
            and all(t is None or t.dtype == torch.float32 for t in dense)
            and ops.applies(x.values(), *dense))  # int32 indices are converted by csr_parts


def sparse_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``torch.nn.functional.linear(x, weight, bias)`` for a sparse CSR ``x`` (n, n_in) of data (no gradient with
    respect to ``x``); weight (n_out, n_in), bias (n_out,); returns (n, n_out) dense."""
    return _SparseLinear.apply(x, weight, bias)


class _BNReLUDropout(torch.autograd.Function):
    """``dropout(relu(batch_norm(x)))`` in training mode for x (n, C), n >= 2, by the native kernels
    ``cv_bn_relu_dropout`` / ``cv_bn_relu_dropout_backward`` (batch statistics; the running statistics are updated
    in place as by ``nn.BatchNorm1d``); the dropout keep flags come from a hash of the element index and ``seeds``."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, momentum, eps, p, seeds):
        scale = 1.0 / (1.0 - p)
        y, mean, invstd = ops.bn_relu_dropout(x, weight, bias, running_mean, running_var, eps, momentum,
                                              _drop_threshold(p), scale, seeds)
        ctx.save_for_backward(x, y, weight, mean, invstd)
        ctx.scale = scale
        return y

    @staticmethod
    def backward(ctx, gy):
        x, y, weight, mean, invstd = ctx.saved_tensors
        need = ctx.needs_input_grad
        dx, dw, db = ops.bn_relu_dropout_backward(x, y, gy.contiguous(), weight, mean, invstd, ctx.scale, need[1],
                                                  need[2])
        return dx if need[0] else None, dw, db, None, None, None, None, None, None


def _drop_threshold(p: float) -> int:
    """The 32-bit word below which a hashed element is dropped: round(p 2^32), at most 2^32 - 1."""
    return min(int(round(p * 2.0**32)), 2**32 - 1)


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2^32 for int64 tensors x in [0, 2^32) and a 32-bit constant c, without int64 overflow."""
    return ((((x * (c >> 16)) & 0xFFFF) << 16) + x * (c & 0xFFFF)) & 0xFFFFFFFF


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """``hash32`` of csrc/fastpath.c (lowbias32) on int64 tensors holding 32-bit words."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def dropout_keep(n: int, p: float, seeds: Sequence[int]) -> torch.Tensor:
    """(n,) bool: the dropout keep flags :func:`bn_relu_dropout` uses for elements 0..n-1 (row-major), dropout
    probability ``p`` and two 32-bit ``seeds``: element j is kept when ``hash32(hash32(j ^ s0) + s1)``, a 32-bit
    word, is at least ``round(p 2^32)`` (probability 1 - p to within 2^-32). The same flags as the native kernel."""
    threshold = _drop_threshold(p)
    j = torch.arange(n, dtype=torch.int64) & 0xFFFFFFFF  # the kernel's 32-bit element index
    h = _hash32((_hash32(j ^ int(seeds[0])) + int(seeds[1])) & 0xFFFFFFFF)
    return h >= threshold


class _LNReLUDropout(torch.autograd.Function):
    """``dropout(relu(layer_norm(x)))`` in training mode for x (n, C), layer norm over each row without an affine
    transform, by the native kernels ``cv_ln_relu_dropout`` / ``cv_ln_relu_dropout_backward``; the dropout keep
    flags come from a hash of the element index and ``seeds`` (as :class:`_BNReLUDropout`)."""

    @staticmethod
    def forward(ctx, x, eps, p, seeds):
        scale = 1.0 / (1.0 - p)
        y, mean, invstd = ops.ln_relu_dropout(x, eps, _drop_threshold(p), scale, seeds)
        ctx.save_for_backward(x, y, mean, invstd)
        ctx.scale = scale
        return y

    @staticmethod
    def backward(ctx, gy):
        x, y, mean, invstd = ctx.saved_tensors
        return ops.ln_relu_dropout_backward(x, y, gy.contiguous(), mean, invstd, ctx.scale), None, None, None


def _fusable_post(post: nn.Module, x: torch.Tensor):
    """``(norm, dropout_p)`` when ``post`` is ``BatchNorm1d -> ReLU [-> Dropout]`` or ``LayerNorm (without affine
    transform, over the last dimension) -> ReLU [-> Dropout]`` in training mode and ``x`` a 2-D float32 CPU tensor
    (with more than one row for batch norm): the cases :func:`bn_relu_dropout` and :func:`ln_relu_dropout` cover;
    else None."""
    if not (post.training and isinstance(post, nn.Sequential) and len(post) in (2, 3) and x.dim() == 2
            and x.dtype == torch.float32 and x.device.type == "cpu"):
        return None
    norm, act = post[0], post[1]
    if type(act) is not nn.ReLU:
        return None
    if type(norm) is nn.BatchNorm1d:
        if not (norm.training and norm.momentum is not None and x.shape[0] > 1):
            return None
        if any(t is not None and (t.dtype != torch.float32 or t.device.type != "cpu")
               for t in (norm.weight, norm.bias, norm.running_mean, norm.running_var)):
            return None
    elif type(norm) is nn.LayerNorm:
        if (norm.weight is not None or norm.bias is not None or tuple(norm.normalized_shape) != (x.shape[1],)
                or x.shape[1] == 0):
            return None
    else:
        return None
    p = 0.0
    if len(post) == 3:
        if type(post[2]) is not nn.Dropout or not post[2].training or not 0.0 <= post[2].p < 1.0:
            return None
        p = float(post[2].p)
    return norm, p


def _fused_post(x: torch.Tensor, norm: nn.Module, p: float) -> torch.Tensor:
    """The fused function of ``norm -> ReLU [-> Dropout(p)]`` that :func:`_fusable_post` found."""
    return bn_relu_dropout(x, norm, p) if type(norm) is nn.BatchNorm1d else ln_relu_dropout(x, norm, p)


def bn_relu_dropout(x: torch.Tensor, bn: nn.BatchNorm1d, p: float) -> torch.Tensor:
    """``Dropout(p)(ReLU()(bn(x)))`` in training mode, with the dropout mask of :func:`dropout_keep`; x (n, C)
    float32 on the CPU with n > 1 (see :func:`_fusable_post`); returns (n, C).

    With the native kernels, one pass forward and one backward instead of six operators; without them, the same
    function from torch operators (``batch_norm``, ``relu`` and the same mask), so training gives the same weights
    either way. It is the function of the three modules (batch statistics, biased variance in the normalisation
    and unbiased in the running variance, Ioffe & Szegedy 2015; inverted dropout, Srivastava et al. 2014): equal
    outputs, gradients and running statistics to float rounding for the same mask (tests/test_native.py). The two
    32-bit seeds of the mask are drawn from torch's global generator, so the mask follows ``torch.manual_seed``,
    but it is not the mask ``nn.Dropout`` would draw.
    """
    seeds = torch.randint(0, 2**32, (2,), dtype=torch.int64).tolist() if p > 0 else [0, 0]
    if bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
    x = x.contiguous()
    if ops.applies(x, bn.weight, bn.bias, bn.running_mean, bn.running_var):
        return _BNReLUDropout.apply(x, bn.weight, bn.bias, bn.running_mean, bn.running_var, float(bn.momentum),
                                    float(bn.eps), p, seeds)
    y = torch.relu(nn.functional.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, True,
                                            float(bn.momentum), float(bn.eps)))
    if p > 0:
        y = torch.where(dropout_keep(x.numel(), p, seeds).view(x.shape), y * (1.0 / (1.0 - p)), 0.0)
    return y



def ln_relu_dropout(x: torch.Tensor, ln: nn.LayerNorm, p: float) -> torch.Tensor:
    """``Dropout(p)(ReLU()(ln(x)))`` in training mode for a ``LayerNorm`` over the last dimension without an affine
    transform (scArches' ``use_layer_norm`` layers); x (n, C) float32 on the CPU; returns (n, C).

    With the native kernels, one call forward and one backward instead of the three modules' operators (and
    torch's Bernoulli draw, about 3-7 ns per element on the CPU); without them, the same function from torch
    operators with the same mask. Layer normalisation as Ba et al. 2016 (biased variance, ``ln.eps`` added to it);
    inverted dropout with the hashed keep flags of :func:`dropout_keep` (two 32-bit seeds drawn from torch's global
    generator), not the mask ``nn.Dropout`` would draw. Equal outputs and input gradients to float rounding for the
    same mask (tests/test_native.py).

    Raises:
        CellvaeInputError: x without columns where the native kernel runs (:func:`_fusable_post` never passes one).
    """
    seeds = torch.randint(0, 2**32, (2,), dtype=torch.int64).tolist() if p > 0 else [0, 0]
    x = x.contiguous()
    if ops.applies(x):
        return _LNReLUDropout.apply(x, float(ln.eps), p, seeds)
    y = torch.relu(nn.functional.layer_norm(x, (x.shape[1],), None, None, float(ln.eps)))
    if p > 0:
        y = torch.where(dropout_keep(x.numel(), p, seeds).view(x.shape), y * (1.0 / (1.0 - p)), 0.0)
    return y

class InputMajorLinear(nn.Module):
    """``torch.nn.Linear`` whose weight is held as its transpose: the parameter ``weight_t`` is a contiguous
    (n_in, n_out) tensor and ``weight`` is its (n_out, n_in) view. This is the layout in which :func:`sparse_linear`
    reads the weight and computes its gradient, and a contiguous parameter keeps the fused Adam step on one pass
    (torch's fused CPU Adam copies a non-contiguous parameter every step).

    The initialisation is ``torch.nn.Linear``'s (the same random draws), and ``state_dict`` / ``load_state_dict``
    use ``nn.Linear``'s key and shape (``weight``, (n_out, n_in)), so saved models do not depend on the layout.

    Args:
        n_in: input features (genes for the first encoder layer).
        n_out: output features.
        bias: whether the layer has a bias (n_out,).

    ``load_state_dict`` raises torch's RuntimeError for a missing ``weight`` or one of another shape, named as for
    ``nn.Linear`` (``size mismatch for weight: ...``).
    """

    def __init__(self, n_in: int, n_out: int, bias: bool = True):
        super().__init__()
        init = nn.Linear(n_in, n_out, bias=bias)
        self.in_features, self.out_features = n_in, n_out
        self.weight_t = nn.Parameter(init.weight.detach().t().contiguous())
        self.bias = init.bias

    @property
    def weight(self) -> torch.Tensor:
        """(n_out, n_in) view of ``weight_t`` (gradients flow to ``weight_t``)."""
        return self.weight_t.t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (n, n_in) dense; returns (n, n_out)."""
        return nn.functional.linear(x, self.weight, self.bias)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        w = self.weight_t if keep_vars else self.weight_t.detach()
        destination[prefix + "weight"] = w.t()
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        key, key_t = prefix + "weight", prefix + "weight_t"
        refused = False
        if key in state_dict:  # load_state_dict passes its own copy of the dict: renaming the key is safe
            w = state_dict.pop(key)
            shape = torch.Size((self.out_features, self.in_features))
            if isinstance(w, torch.Tensor) and w.shape == shape:
                state_dict[key_t] = w.t()
            else:  # torch's message, in nn.Linear's terms
                got = w.shape if isinstance(w, torch.Tensor) else type(w).__name__
                error_msgs.append(f"size mismatch for {key}: copying a param with shape {got} from checkpoint, "
                                  f"the shape in current model is {shape}.")
                refused = True
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if key_t in missing_keys:  # reported under nn.Linear's key, or not at all when refused above
            if refused:
                missing_keys.remove(key_t)
            else:
                missing_keys[missing_keys.index(key_t)] = key

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class CovariateLinear(nn.Module):
    """``y = W x + b + sum_k E_k[c_k] + V u``: a linear layer on ``[x, onehot(c_1), ..., onehot(c_K), u]``.

    Args:
        n_in: input features.
        n_out: output features.
        n_cats: number of categories of each categorical covariate (batch first, by convention).
        n_cont: number of continuous covariates.
        bias: whether ``W x`` has a bias.
        input_major: hold ``W`` as its transpose (:class:`InputMajorLinear`), the layout of sparse inputs.
    """

    def __init__(self, n_in: int, n_out: int, n_cats: Sequence[int] = (), n_cont: int = 0, bias: bool = True,
                 input_major: bool = False):
        super().__init__()
        self.linear = (InputMajorLinear if input_major else nn.Linear)(n_in, n_out, bias=bias)
        self.embeddings = nn.ModuleList(nn.Embedding(n, n_out) for n in n_cats if n > 1)
        self._use = [n > 1 for n in n_cats]
        self.cont = nn.Linear(n_cont, n_out, bias=False) if n_cont > 0 else None
        bound = 1.0 / (n_in + sum(n for n in n_cats if n > 1) + n_cont) ** 0.5
        for emb in self.embeddings:
            nn.init.uniform_(emb.weight, -bound, bound)

    def forward(self, x: torch.Tensor, cat: torch.Tensor | None = None, cont: torch.Tensor | None = None):
        """x: (n, n_in) dense or sparse CSR (data); cat: (n, n_cat_covariates) int64 codes; cont: (n, n_cont)."""
        y = sparse_linear(x, self.linear.weight, self.linear.bias) if x.layout == torch.sparse_csr else self.linear(x)
        if len(self.embeddings):
            j = 0
            for k, use in enumerate(self._use):
                if use:
                    y = y + self.embeddings[j](cat[:, k])
                    j += 1
        if self.cont is not None:
            y = y + self.cont(cont)
        return y


class FCLayers(nn.Module):
    """A stack of ``CovariateLinear -> BatchNorm (or LayerNorm) -> ReLU -> Dropout`` layers (in training on the CPU,
    the last three run fused, :func:`bn_relu_dropout` and :func:`ln_relu_dropout`).

    Args:
        n_in: input features.
        n_out: output features of the last layer.
        n_cats: categories per categorical covariate; covariates are injected into the first layer, and into
            every layer when ``inject_covariates`` is True (scVI's ``deeply_inject_covariates``).
        n_cont: number of continuous covariates.
        n_layers: number of layers (>= 1).
        n_hidden: width of the hidden layers.
        dropout_rate: dropout after each activation.
        use_batch_norm: batch normalisation (momentum 0.01, eps 1e-3, as scVI) after each linear map.
        use_layer_norm: layer normalisation instead.
        input_major_first: the first linear map is an :class:`InputMajorLinear` (for sparse CSR inputs).
    """

    def __init__(
        self,
        n_in: int,
        n_out: int,
        n_cats: Sequence[int] = (),
        n_cont: int = 0,
        n_layers: int = 1,
        n_hidden: int = 128,
        dropout_rate: float = 0.1,
        use_batch_norm: bool = True,
        use_layer_norm: bool = False,
        inject_covariates: bool = True,
        input_major_first: bool = False,
    ):
        super().__init__()
        dims = [n_in] + [n_hidden] * (n_layers - 1) + [n_out]
        self.linears = nn.ModuleList()
        self.post = nn.ModuleList()
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
            inject = i == 0 or inject_covariates
            self.linears.append(
                CovariateLinear(a, b, n_cats if inject else (), n_cont if inject else 0,
                                input_major=input_major_first and i == 0)
            )
            parts: list[nn.Module] = []
            if use_batch_norm:
                parts.append(nn.BatchNorm1d(b, momentum=0.01, eps=1e-3))
            if use_layer_norm:
                parts.append(nn.LayerNorm(b, elementwise_affine=False))
            parts.append(nn.ReLU())
            if dropout_rate > 0:
                parts.append(nn.Dropout(dropout_rate))
            self.post.append(nn.Sequential(*parts))

    def forward(self, x: torch.Tensor, cat: torch.Tensor | None = None, cont: torch.Tensor | None = None):
        for lin, post in zip(self.linears, self.post):
            x = lin(x, cat, cont)
            fused = _fusable_post(post, x)  # training on the CPU: batch / layer norm, ReLU and dropout fused
            x = _fused_post(x, *fused) if fused is not None else post(x)
        return x


class Encoder(nn.Module):
    """Gaussian encoder q(z | x) = N(mean, var) with ``var = exp(h) + var_eps`` (scVI).

    Args:
        n_in: input features (genes).
        n_out: latent dimension.
        var_eps: minimum variance, for numerical stability.
        Other arguments as :class:`FCLayers` (hidden part).

    ``forward`` returns ``(mean, var)``, each (n_cells, n_out).
    """

    def __init__(
        self,
        n_in: int,
        n_out: int,
        n_cats: Sequence[int] = (),
        n_cont: int = 0,
        n_layers: int = 1,
        n_hidden: int = 128,
        dropout_rate: float = 0.1,
        use_batch_norm: bool = True,
        use_layer_norm: bool = False,
        inject_covariates: bool = True,
        var_eps: float = 1e-4,
    ):
        super().__init__()
        self.encoder = FCLayers(
            n_in, n_hidden, n_cats, n_cont, n_layers, n_hidden, dropout_rate,
            use_batch_norm, use_layer_norm, inject_covariates, input_major_first=True,
        )
        self.mean_encoder = nn.Linear(n_hidden, n_out)
        self.var_encoder = nn.Linear(n_hidden, n_out)
        self.var_eps = var_eps

    def forward(self, x: torch.Tensor, cat: torch.Tensor | None = None, cont: torch.Tensor | None = None):
        h = self.encoder(x, cat, cont)
        return self.mean_encoder(h), torch.exp(self.var_encoder(h)) + self.var_eps


class DecoderSCVI(nn.Module):
    """scVI decoder: ``rho = softmax(f(z, s))`` (normalized expression, rows sum to 1), optional per-cell
    dispersion head and zero-inflation logits head.

    Args:
        n_in: latent dimension.
        n_out: genes.
        gene_cell_dispersion: add a head returning log theta per cell and gene.
        latent_skip: the heads read ``[hidden, z]`` (n_cells, n_hidden + n_in) instead of the hidden layer alone
            (totalVI's RNA decoder, Gayoso et al. 2021).
        dropout_rate: dropout on the hidden layers (0: scVI's decoder; 0.2: totalVI's).
        softmax: if False, the first output is the raw linear output (a Gaussian mean on log1p data).
        Other arguments as :class:`FCLayers`.

    ``forward`` returns ``(rho, log_theta or None, zi_logits)``, each (n_cells, n_genes).
    """

    def __init__(
        self,
        n_in: int,
        n_out: int,
        n_cats: Sequence[int] = (),
        n_cont: int = 0,
        n_layers: int = 1,
        n_hidden: int = 128,
        use_batch_norm: bool = True,
        use_layer_norm: bool = False,
        inject_covariates: bool = True,
        gene_cell_dispersion: bool = False,
        softmax: bool = True,
        latent_skip: bool = False,
        dropout_rate: float = 0.0,
    ):
        super().__init__()
        self.softmax = softmax
        self.latent_skip = bool(latent_skip)
        self.px_decoder = FCLayers(
            n_in, n_hidden, n_cats, n_cont, n_layers, n_hidden, dropout_rate,
            use_batch_norm, use_layer_norm, inject_covariates,
        )
        n_head = n_hidden + (n_in if self.latent_skip else 0)
        self.scale_decoder = nn.Linear(n_head, n_out)
        self.dropout_decoder = nn.Linear(n_head, n_out)
        self.dispersion_decoder = nn.Linear(n_head, n_out) if gene_cell_dispersion else None

    def forward(self, z: torch.Tensor, cat: torch.Tensor | None = None, cont: torch.Tensor | None = None):
        logits, log_theta, zi_logits = self.forward_logits(z, cat, cont)
        rho = torch.softmax(logits, dim=-1) if self.softmax else logits
        return rho, log_theta, zi_logits

    def hidden(self, z: torch.Tensor, cat: torch.Tensor | None = None, cont: torch.Tensor | None = None):
        """(n_cells, n_hidden) last hidden layer, the input of the output heads (``scale_decoder`` gives the
        logits, ``dropout_decoder`` the zero-inflation logits, ``dispersion_decoder`` log theta); with
        ``latent_skip``, (n_cells, n_hidden + n_latent): the hidden layer, then z."""
        h = self.px_decoder(z, cat, cont)
        return torch.cat([h, z], dim=-1) if self.latent_skip else h

    def forward_logits(self, z: torch.Tensor, cat: torch.Tensor | None = None, cont: torch.Tensor | None = None,
                       zero_inflation: bool = True):
        """``(logits, log_theta or None, zi_logits or None)``: the decoder before the softmax (rho =
        softmax(logits)); ``zero_inflation=False`` skips the zero-inflation head (NB and Poisson do not use it)."""
        h = self.hidden(z, cat, cont)
        log_theta = self.dispersion_decoder(h) if self.dispersion_decoder is not None else None
        zi_logits = self.dropout_decoder(h) if zero_inflation else None
        return self.scale_decoder(h), log_theta, zi_logits

    @property
    def logits_bias(self) -> nn.Parameter:
        """(n_genes,) the bias added to every cell's logits (``scale_decoder.bias``), which
        :meth:`cellvae.vae.module.VAEModule.init_decoder_bias` sets."""
        return self.scale_decoder.bias


class LinearDecoderSCVI(nn.Module):
    """The linear decoder of LDVAE (Svensson et al. 2020, Bioinformatics 36:3418, "Interpretable factor models of
    single-cell RNA-seq via variational autoencoders"; scvi-tools' ``LinearDecoderSCVI``):
    ``rho = softmax(BN(W z + sum_k E_k[c_k] + V u))``, so each latent dimension k moves the log expression of
    gene g by ``W[g, k]`` (times the batch norm's scale): the loadings of a factor model. The zero-inflation logits
    are a second linear map of z of the same form. There is no hidden layer and no activation.

    Args:
        n_in: latent dimension.
        n_out: genes.
        n_cats, n_cont: covariates (as :class:`CovariateLinear`), added to the linear map.
        use_batch_norm: batch normalisation (momentum 0.01, eps 1e-3) of the logits, as scvi-tools' LDVAE default;
            its affine bias is then the genes' intercept and the linear maps have no bias of their own.
        use_layer_norm: layer normalisation (no affine part) of the logits instead.
        softmax: if False, the first output is the linear map itself (a Gaussian mean on log1p data).

    ``forward`` returns ``(rho, None, zi_logits)``, each (n_cells, n_genes): no per-cell dispersion head.
    """

    def __init__(self, n_in: int, n_out: int, n_cats: Sequence[int] = (), n_cont: int = 0,
                 use_batch_norm: bool = True, use_layer_norm: bool = False, softmax: bool = True):
        super().__init__()
        self.softmax = softmax
        bias = not use_batch_norm

        def norm():
            if use_batch_norm:
                return nn.BatchNorm1d(n_out, momentum=0.01, eps=1e-3)
            return nn.LayerNorm(n_out, elementwise_affine=False) if use_layer_norm else nn.Identity()

        self.factor_regressor = CovariateLinear(n_in, n_out, n_cats, n_cont, bias=bias)
        self.factor_norm = norm()
        self.dropout_regressor = CovariateLinear(n_in, n_out, n_cats, n_cont, bias=bias)
        self.dropout_norm = norm()

    def forward(self, z: torch.Tensor, cat: torch.Tensor | None = None, cont: torch.Tensor | None = None):
        logits, _, zi_logits = self.forward_logits(z, cat, cont)
        rho = torch.softmax(logits, dim=-1) if self.softmax else logits
        return rho, None, zi_logits

    def forward_logits(self, z: torch.Tensor, cat: torch.Tensor | None = None, cont: torch.Tensor | None = None,
                       zero_inflation: bool = True):
        """``(logits, None, zi_logits or None)``: the decoder before the softmax."""
        logits = self.factor_norm(self.factor_regressor(z, cat, cont))
        zi_logits = self.dropout_norm(self.dropout_regressor(z, cat, cont)) if zero_inflation else None
        return logits, None, zi_logits

    @property
    def logits_bias(self) -> nn.Parameter:
        """(n_genes,) the genes' intercept on the logits: the batch norm's affine bias, else the linear map's."""
        bn = self.factor_norm
        return bn.bias if isinstance(bn, nn.BatchNorm1d) else self.factor_regressor.linear.bias

    @torch.no_grad()
    def loadings(self) -> torch.Tensor:
        """(n_genes, n_latent) the change of each gene's logit (log normalized expression, up to the softmax's
        common shift) per unit of each latent dimension: ``W``, times the batch norm's scale
        ``gamma / sqrt(running_var + eps)`` when there is one (scvi-tools' ``LinearSCVI.get_loadings``)."""
        w = self.factor_regressor.linear.weight.detach().clone()
        bn = self.factor_norm
        if isinstance(bn, nn.BatchNorm1d):
            w = w * (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach().unsqueeze(-1)
        return w
