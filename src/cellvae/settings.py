"""Settings of cellvae's models, training and jobs as frozen dataclasses: every default is written once, here.

- :class:`DataSettings`: which parts of an AnnData the model reads (layer, batch key, labels key, covariates);
- :class:`ModelSettings`: the architecture and likelihood of a :class:`cellvae.CountVAE` (scvi-tools' SCVI
  defaults where it has one);
- :class:`TrainSettings`: the optimiser, KL warm-up, early stopping, initialisation and run options;
- :class:`FitJobSettings`: what ``cellvae fit`` adds around them (gene selection, out of core, output directory).

They flow from the command line (``cellvae fit``'s options are generated from the fields that carry ``cli``
metadata, :func:`cli_fields`) to the job, the model and the training loop, and are saved with the model
(``config.json``: ``module_kwargs`` is :class:`ModelSettings` as a dict), in training checkpoints (``plan``) and
in ``uns['cellvae']['settings']``. Each class checks its values when it is made and raises
:class:`cellvae.CellvaeInputError` with what is wrong and how to fix it.

The vocabularies (gene likelihoods, dispersions, ...) are named here too; :mod:`cellvae.vae.likelihoods` maps each
gene likelihood name to the object that implements it.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import numbers
from dataclasses import dataclass, field
from typing import Callable, Iterator

from numpy import bool_ as np_bool

from .errors import CellvaeInputError

__all__ = ["GENE_LIKELIHOODS", "DISPERSIONS", "ADVERSARIAL_MODES", "NORM_CHOICES", "ENCODER_INPUTS",
           "LR_SCHEDULES", "DISPERSION_LR_DECAYS", "DECODER_BIAS_INITS", "DECODERS", "ACCELERATORS", "DataSettings", "ModelSettings", "TrainSettings",
           "FitJobSettings", "RNAProteinSettings", "PROTEIN_DISPERSIONS", "TrainingPlan", "default_max_epochs", "parse_dispersion_init", "parse_dispersion_lr_decay", "cli_fields",
           "as_dict", "from_dict", "build", "with_signature"]

GENE_LIKELIHOODS = ("zinb", "nb", "poisson", "normal", "zip")
DISPERSIONS = ("gene", "gene-batch", "gene-cell")
ADVERSARIAL_MODES = ("confusion", "gradient_reversal")
NORM_CHOICES = ("both", "encoder", "decoder", "none")
ENCODER_INPUTS = ("log1p", "log1p_cp10k", "log1p_mean")
LR_SCHEDULES = ("constant", "cosine", "plateau")
_LR_FACTOR, _LR_PATIENCE = 0.6, 30  # the "plateau" schedule's defaults (scvi-tools' reduce_lr_on_plateau)
DISPERSION_LR_DECAYS = ("none", "warmup")
DECODER_BIAS_INITS = ("frequency", "default")
ACCELERATORS = ("auto", "cpu", "cuda")
PROTEIN_DISPERSIONS = ("protein", "protein-batch")
DECODERS = ("nonlinear", "linear")


def _opt(flag: str | None = None, help: str = "", **extra) -> dict:
    """Field metadata: ``flag`` is the ``cellvae fit`` option generated for the field (None: not on the command
    line); ``extra`` may hold ``choices``, ``parse`` (a str -> value function), ``metavar``, ``secondary`` (the
    off form of a boolean flag), ``min``/``min_open`` (a lower bound) and ``max`` (an upper bound: sizes read from
    a file must not control an allocation unchecked)."""
    return {"cli": flag, "help": help, **extra}


# ------------------------------------------------------------------------------------------ checks
def _number(name: str, value, *, integer: bool = False, lo: float | None = None, lo_open: bool = False,
            hi: float | None = None, none_ok: bool = False):
    """``value`` as a Python int (with ``integer``) or float; raise CellvaeInputError unless it is a finite number
    (a whole one with ``integer``) above ``lo`` and at most ``hi``."""
    if value is None and none_ok:
        return None
    kind = "an integer" if integer else "a number"
    ok = isinstance(value, numbers.Real) and not isinstance(value, (bool, np_bool))
    if ok:
        v = float(value)
        ok = math.isfinite(v) and (not integer or v.is_integer())
        if ok and lo is not None:
            ok = v > lo if lo_open else v >= lo
        if ok and hi is not None:
            ok = v <= hi
    if not ok:
        if lo == 0 and lo_open and hi is None:
            raise CellvaeInputError(f"{name} must be a positive {kind.split()[-1]}, got {value!r}.")
        bound = "" if lo is None else f" {'>' if lo_open else '>='} {lo:g}"
        bound += "" if hi is None else f"{' and' if lo is not None else ''} <= {hi:g}"
        raise CellvaeInputError(f"{name} must be {kind}{bound}, got {value!r}.")
    return int(v) if integer else v


def _choice(name: str, value, choices: tuple) -> None:
    if value not in choices:
        raise CellvaeInputError(f"{name} must be one of {', '.join(map(str, choices))}; got {value!r}.")


def _check_fields(obj) -> None:
    """Generic checks from the field metadata (choices, numeric bounds, integer types)."""
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if "choices" in f.metadata:
            _choice(f.name, v, f.metadata["choices"])
        elif f.type in ("int", "int | None", "float", "float | None"):
            v = _number(f.name, v, integer=f.type.startswith("int"), lo=f.metadata.get("min"),
                        lo_open=f.metadata.get("min_open", False), hi=f.metadata.get("max"),
                        none_ok=f.type.endswith("None"))
            object.__setattr__(obj, f.name, v)
        elif f.type == "bool":
            if not isinstance(v, (bool, np_bool)):
                raise CellvaeInputError(f"{f.name} must be True or False, got {v!r}.")
            object.__setattr__(obj, f.name, bool(v))


def parse_dispersion_init(value) -> str | float:
    """``"random"`` or a finite log theta: the values ``dispersion_init`` accepts (a string from the command line
    is converted).

    Raises:
        CellvaeInputError: anything else (NaN, inf, booleans, other words).
    """
    if isinstance(value, str) and value == "random":
        return value
    if isinstance(value, bool):
        value = math.nan
    try:
        v = float(value)
    except (TypeError, ValueError):
        v = math.nan
    if not math.isfinite(v):
        raise CellvaeInputError(f"dispersion_init must be 'random' or a finite log theta (a number), got {value!r}.")
    return v


def parse_dispersion_lr_decay(value) -> str | int:
    """``"none"``, ``"warmup"`` or a positive whole number of optimizer steps: the values ``dispersion_lr_decay``
    accepts (a string of digits from the command line is converted).

    Raises:
        CellvaeInputError: anything else (booleans, fractions, zero or negative numbers, other words).
    """
    if isinstance(value, str) and value in DISPERSION_LR_DECAYS:
        return value
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return int(value)
    raise CellvaeInputError(f"dispersion_lr_decay must be 'none', 'warmup' or a positive whole number of steps, "
                            f"got {value!r}.")


# ---------------------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class DataSettings:
    """Which parts of the AnnData a model reads (scvi-tools' ``setup_anndata`` arguments).

    Attributes:
        layer: layer with raw counts (None: ``X``).
        batch_key: obs column of the batch (a categorical covariate of the decoder, and the library prior).
        labels_key: obs column of known cell types (reports and metrics; not used in training).
        categorical_covariate_keys: further categorical obs columns injected into the decoder.
        continuous_covariate_keys: numeric obs columns injected into the decoder.
        protein_key: obsm key of the surface-protein counts of a joint RNA + protein model
            (:class:`cellvae.RNAProteinVAE`; None: RNA only).
    """

    layer: str | None = field(default=None, metadata=_opt("--layer", "Layer with raw counts (default: X)."))
    batch_key: str | None = field(default=None, metadata=_opt("--batch-key", "obs column of the batch covariate."))
    labels_key: str | None = field(default=None, metadata=_opt(
        "--labels-key", "obs column of known cell types (metrics, figures, marker genes)."))
    categorical_covariate_keys: tuple[str, ...] = ()
    continuous_covariate_keys: tuple[str, ...] = ()
    protein_key: str | None = field(default=None, metadata=_opt(
        "--protein-key", "obsm key of surface-protein (ADT) counts (e.g. protein_expression): fit the joint RNA + "
        "protein model (totalVI class). A .h5mu file uses its 'prot' modality without it."))

    def __post_init__(self):
        for name in ("categorical_covariate_keys", "continuous_covariate_keys"):
            v = getattr(self, name)
            if v is None or isinstance(v, str):
                v = () if v is None else (v,)
            object.__setattr__(self, name, tuple(str(k) for k in v))


# scArches' reference architecture (Lotfollahi et al. 2022, Nat. Biotechnol. 40:121; scvi-tools' ``arches_params``):
# covariates enter the encoder too, so that query surgery (new embedding rows, the rest frozen) can move a query's
# latent representation; layer norm instead of batch norm, whose running statistics would be the reference's.
ARCHES_SETTINGS = {"encode_covariates": True, "use_batch_norm": "none", "use_layer_norm": "both"}
ARCHITECTURES = ("auto", "scvi", "arches")


@dataclass(frozen=True)
class ModelSettings:
    """Architecture and likelihood of the scVI module (Lopez et al. 2018; defaults as scvi-tools' ``SCVI``).

    Attributes:
        gene_likelihood: ``"zinb"``, ``"nb"``, ``"poisson"``, ``"zip"`` (zero-inflated Poisson) or ``"normal"`` (a
            Gaussian VAE on log1p-normalized data); see :mod:`cellvae.vae.likelihoods`.
        dispersion: inverse dispersion theta per ``"gene"``, ``"gene-batch"`` or ``"gene-cell"``.
        n_hidden, n_latent, n_layers, dropout_rate: network sizes (128, 10, 1, 0.1).
        use_observed_lib_size: library size = the cell's total counts (True) or a latent log-normal (False).
        encode_covariates: also inject covariates into the encoder.
        deeply_inject_covariates: inject covariates into every hidden layer, not only the first.
        use_batch_norm, use_layer_norm: ``"both"``, ``"encoder"``, ``"decoder"`` or ``"none"``.
        encoder_input: ``"log1p"`` (scVI: ``log1p(x)``), ``"log1p_cp10k"`` (``log1p`` of counts scaled to
            10,000 per cell) or ``"log1p_mean"`` (totalVI's: ``log1p(x / (1 + mean_g x_g))``).
        beta: KL weight of z after the warm-up (beta-VAE, Higgins et al. 2017; 1.0 is the ELBO).
        adversarial_batch_weight: weight of an adversarial batch classifier on the latent means (0: none); needs
            a batch covariate with >= 2 batches. ``adversarial_mode``: ``"confusion"`` or ``"gradient_reversal"``
            (see :class:`cellvae.vae.module.VAEModule`).
        use_fast_likelihood, use_sparse_counts: use the fused training likelihood and sparse (CSR) minibatches
            where they apply (same values to float rounding; off only for tests and comparisons).
        decoder: ``"nonlinear"`` (scVI's: hidden layers, ReLU) or ``"linear"``: LDVAE (Svensson et al. 2020,
            Bioinformatics 36:3418; scvi-tools' ``LinearSCVI``): the logits of rho are a linear map of z (with batch
            norm), so each latent dimension has interpretable gene loadings (:meth:`cellvae.CountVAE.get_loadings`,
            :class:`cellvae.LinearCountVAE`); the encoder keeps ``n_layers``. Not with ``dispersion="gene-cell"``.
        latent_skip: with the nonlinear decoder, its output heads (gene logits, zero-inflation and per-cell
            dispersion) read the last hidden layer and z side by side, so z also reaches the logits linearly: the
            RNA decoder of totalVI (Gayoso et al. 2021, Nat Methods 18:272; scvi-tools' ``DecoderTOTALVI``
            concatenates ``[px, z]`` before ``px_scale_decoder``). False (scVI's decoder) by default.
        dropout_rate_decoder: dropout on the nonlinear decoder's hidden layers (and on the joint model's protein
            decoder), in [0, 1). 0 (scVI's decoder) by default; scvi-tools' TOTALVI uses 0.2, which in the joint
            model raised held-out log p at default training but lowered it after 100 epochs
            (``benchmarks/results/rna_protein_default_trials.md``).
        classification_ratio: label-transfer models only (:class:`cellvae.LabelTransferVAE`): weight of the
            classifier's cross-entropy on labelled cells added to the negative ELBO (50, as scvi-tools' SCANVI;
            Kingma et al. 2014, Eq. 9). ``class_weighting``: ``"balanced"`` weighs each labelled cell's
            cross-entropy by ``n_labelled / (n_labels * n_cells_of_its_label)`` (every label counts alike, so rare
            types are predicted; scvi-tools gets a similar effect from sampling ``n_samples_per_label`` cells per
            label) or ``"none"`` (every cell alike).
    """

    gene_likelihood: str = field(default="zinb", metadata=_opt("--gene-likelihood", choices=GENE_LIKELIHOODS))
    dispersion: str = field(default="gene", metadata=_opt("--dispersion", choices=DISPERSIONS))
    n_hidden: int = field(default=128, metadata=_opt("--n-hidden", "Hidden units per layer.", min=1, max=65536))
    n_latent: int = field(default=10, metadata=_opt("--n-latent", "Dimensions of the latent space.", min=1, max=4096))
    n_layers: int = field(default=1, metadata=_opt("--n-layers", "Hidden layers of encoder and decoder.", min=1,
                                                   max=64))
    dropout_rate: float = field(default=0.1, metadata={"min": 0.0})
    use_observed_lib_size: bool = field(default=True, metadata=_opt(
        "--observed-library", "Library size: the observed total counts, or a latent log-normal.",
        secondary="--latent-library"))
    encode_covariates: bool = False
    deeply_inject_covariates: bool = True
    use_batch_norm: str = field(default="both", metadata={"choices": NORM_CHOICES})
    use_layer_norm: str = field(default="none", metadata={"choices": NORM_CHOICES})
    encoder_input: str = field(default="log1p", metadata={"choices": ENCODER_INPUTS})
    beta: float = field(default=1.0, metadata=_opt(
        "--beta", "KL weight of z after the KL warm-up (beta-VAE, Higgins et al. 2017): 1 is the ELBO; > 1 favours "
        "a smoother, more disentangled latent space, < 1 better reconstruction.", min=0.0))
    adversarial_batch_weight: float = field(default=0.0, metadata=_opt(
        "--adversarial-batch-weight",
        "With --batch-key: weight of an adversarial batch classifier on the latent space (domain confusion; 0 = "
        "off; 3 scored best in benchmarks/results/integration.md, 10 over-mixed cell types on one dataset). "
        "Removes batch signal from the latent space beyond the decoder's batch covariate.", min=0.0))
    adversarial_mode: str = field(default="confusion", metadata={"choices": ADVERSARIAL_MODES})
    use_fast_likelihood: bool = True
    use_sparse_counts: bool = True
    decoder: str = field(default="nonlinear", metadata=_opt(
        "--decoder", "nonlinear: scVI's decoder; linear: LDVAE (Svensson et al. 2020), a linear map from the latent "
        "space to the genes' log expression, whose loadings the report lists (top genes per latent dimension).",
        choices=DECODERS))
    latent_skip: bool = False
    dropout_rate_decoder: float = field(default=0.0, metadata={"min": 0.0})
    classification_ratio: float = field(default=50.0, metadata={"min": 0.0})
    class_weighting: str = field(default="balanced", metadata={"choices": ("balanced", "none")})

    def __post_init__(self):
        _check_fields(self)
        for name in ("dropout_rate", "dropout_rate_decoder"):
            if getattr(self, name) >= 1.0:
                raise CellvaeInputError(f"{name} must be in [0, 1), got {getattr(self, name)!r}.")
        if self.decoder == "linear" and self.dispersion == "gene-cell":
            raise CellvaeInputError("decoder='linear' (LDVAE) has no per-cell dispersion head: use dispersion='gene' "
                                    "or 'gene-batch' (--dispersion), or decoder='nonlinear'.")
        if self.decoder == "linear" and self.latent_skip:
            raise CellvaeInputError("latent_skip=True adds z to the inputs of the nonlinear decoder's output heads; "
                                    "the linear decoder (LDVAE) already maps z linearly: use decoder='nonlinear' or "
                                    "latent_skip=False.")


def default_max_epochs(n_cells: int) -> int:
    """Epoch heuristic when ``max_epochs`` is not given: ``min(400, round(20000 / n_cells * 400))``, at least 10
    (the scvi-tools heuristic, with a floor so that very large data still gets a warm-up and a few epochs)."""
    return int(max(10, min(400, round(20000 / max(n_cells, 1) * 400))))


@dataclass(frozen=True)
class TrainSettings:
    """Training settings (defaults as scvi-tools where it has one, and where a benchmark chose better).

    Attributes:
        max_epochs: passes over the training cells; None: :func:`default_max_epochs` of the cells with counts.
        batch_size: cells per minibatch (128).
        train_size: fraction of cells for training; the rest (seeded split) is the validation set for early
            stopping and the reported validation ELBO.
        lr, weight_decay, eps: Adam settings (1e-3, 1e-6, 0.01); ``lr`` is the peak of a schedule.
        lr_schedule: ``"constant"`` (``lr`` throughout, as scvi-tools) or ``"cosine"``: per step from ``lr`` down to
            ``COSINE_FLOOR * lr`` at the last step of ``max_epochs`` (Loshchilov & Hutter 2017, SGDR, eq. 5;
            :func:`cellvae.train.schedule.lr_at`). With ``lr=2e-3`` it reached a given validation ELBO in fewer
            epochs on some datasets, but its best validation ELBO was 0.30 % lower on average over five datasets
            (``benchmarks/results/lr_schedule.md``), hence the default. ``"plateau"``: ``lr`` times ``lr_factor``
            each time the validation ELBO has not improved for more than ``lr_patience`` epochs, down to ``lr_min``
            (scvi-tools' ``reduce_lr_on_plateau``, TOTALVI's default; :func:`cellvae.train.schedule.
            plateau_reductions`); it needs validation cells (``train_size < 1``).
        lr_factor, lr_patience, lr_min: the ``"plateau"`` schedule's cut (0.6), bad epochs before a cut (30) and
            lowest learning rate (0), scvi-tools' defaults; the other schedules ignore them.
        n_epochs_kl_warmup: epochs over which the KL weight of z rises linearly (per step) from 0 to ``beta``. None:
            ``max(1, min(400, max_epochs // 2))``, so full weight is reached by the middle of the run whatever its
            length (scvi-tools' fixed 400 epochs never complete in a shorter run); a model class can lower the cap
            (``RNAProteinVAE.KL_WARMUP_CAP``: 50).
        early_stopping: stop when the validation ELBO has not improved by ``early_stopping_min_delta`` nats per cell
            for ``early_stopping_patience`` epochs, counted after the warm-up; the best weights are restored. For a
            model with a label classifier (``LabelTransferVAE``) the ELBO minus ``classification_ratio`` times the
            classifier's validation cross-entropy is tracked (:func:`cellvae.train.loop.validation_score`).
        decoder_bias_init: initial bias of the decoder's logits layer (count likelihoods; first fit only).
            ``"frequency"``: the log of each gene's share of the training cells' counts (the maximum-likelihood bias
            when the rest of the decoder's output is zero; training starts from the average profile and reaches a
            given validation ELBO in fewer epochs, ``benchmarks/results/decoder_bias_init.md``); ``"default"``:
            PyTorch's initialisation, as scvi-tools.
        dispersion_init: initial log theta of NB / ZINB with ``"gene"`` / ``"gene-batch"`` dispersion (first fit
            only): ``"random"`` (one N(0, 1) draw per gene, as scvi-tools) or one number for every gene
            (``benchmarks/results/dispersion_init.md``).
        dispersion_lr_multiplier: the learning rate of log theta (scVI's ``px_r``) is ``lr`` times this (its own
            Adam parameter group). Adam moves a weight by at most about ``lr`` per step, so at lr 1e-3 log theta
            needs thousands of steps to leave its N(0, 1) start; 30 gave a better best validation ELBO on all five
            datasets of ``benchmarks/results/dispersion_lr.md`` (+0.20 % to +5.6 % in 10 runs, with the 1000-step
            decay below). 1 is scvi-tools' setting. Other likelihoods ignore it.
        dispersion_lr_decay: a whole number N (default 1000): the multiplier falls linearly (per step) from
            ``dispersion_lr_multiplier`` to 1 over the first N optimizer steps (minibatches), whatever the data size,
            and is 1 after them, as in scvi-tools: log theta leaves its random start fast, then learns at the rate
            of the other weights. ``"warmup"``: the same over the KL warm-up; ``"none"``:
            ``dispersion_lr_multiplier`` throughout (:func:`cellvae.train.schedule.dispersion_lr_multiplier_at`).
            Steps, not epochs, because Adam moves a weight by about its learning rate per step (a 300-cell set has
            2-3 steps per epoch). 1000 was chosen on six datasets against ``"none"``, ``"warmup"``, 2000 steps and
            50 epochs, at cellvae's default schedule and at scvi-tools' (400 epochs, 400-epoch warm-up), and
            confirmed on six others (``benchmarks/results/dispersion_lr_decay.md``): ``"none"`` gave a better
            held-out log p(x) at the default schedule than a multiplier of 1, but a worse one at scvi-tools'.
        seed: seeds initialisation, split, minibatch order, dropout and sampling.
        progress_bar: show a tqdm bar with epoch, train and validation ELBO.
        n_threads: torch threads while training. None: on the CPU, chosen by timing a few training steps at the
            idle-core count of :func:`cellvae.train.threads.default_n_threads` and at all physical cores, again every
            30 s (:class:`cellvae.train.threads.ThreadTrial`); results are then not bit-identical between runs. A
            number fixes the count: the same seed, data and count give bit-identical weights on the CPU.
        checkpoint_every: with a checkpoint directory, epochs between checkpoints (and always at the end).
        max_bad_steps: stop with :class:`cellvae.CellvaeTrainingError` after this many consecutive minibatches
            with a non-finite loss or gradients (each is skipped).
        check_finite: check the loss and gradients at every step (off only to measure its cost).
        accelerator: ``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda"``.
        fused_optimizer: torch's fused Adam where available (same update to float rounding).
    """

    max_epochs: int | None = field(default=None, metadata=_opt(
        "--max-epochs", "Default: min(400, 20000/n_cells*400), with early stopping.", min=1))
    batch_size: int = field(default=128, metadata=_opt("--batch-size", "Cells per minibatch.", min=2))
    train_size: float = field(default=0.9, metadata={"min": 0.0, "min_open": True})
    lr: float = field(default=1e-3, metadata=_opt("--lr", "(Peak) learning rate of Adam (1e-3: scvi-tools' default).",
                                                  min=0.0, min_open=True))
    weight_decay: float = field(default=1e-6, metadata={"min": 0.0})
    eps: float = field(default=0.01, metadata={"min": 0.0, "min_open": True})
    lr_schedule: str = field(default="constant", metadata=_opt(
        "--lr-schedule", "constant: --lr throughout; cosine: from --lr down to --lr/100 at the last epoch; plateau: "
        f"--lr times {_LR_FACTOR} after {_LR_PATIENCE} epochs without a better validation ELBO (scvi-tools' "
        "reduce_lr_on_plateau).", choices=LR_SCHEDULES))
    lr_factor: float = field(default=_LR_FACTOR, metadata={"min": 0.0, "min_open": True, "max": 1.0})
    lr_patience: int = field(default=_LR_PATIENCE, metadata={"min": 0})
    lr_min: float = field(default=0.0, metadata={"min": 0.0})
    n_epochs_kl_warmup: int | None = field(default=None, metadata={"min": 0})
    early_stopping: bool = field(default=True, metadata=_opt("--early-stopping", secondary="--no-early-stopping"))
    early_stopping_patience: int = field(default=45, metadata={"min": 1})
    early_stopping_min_delta: float = field(default=0.0, metadata={"min": 0.0})
    decoder_bias_init: str = field(default="frequency", metadata=_opt(
        "--decoder-bias-init", "Initial decoder bias: frequency: log of each gene's share of the training counts "
        "(starts from the average profile); default: PyTorch's initialisation, as scvi-tools.",
        choices=DECODER_BIAS_INITS))
    dispersion_init: str | float = field(default="random", metadata=_opt(
        "--dispersion-init", "Initial log theta (NB / ZINB with gene or gene-batch dispersion): random: one N(0, 1) "
        "draw per gene, as scvi-tools; a number: that log theta for every gene.", parse=parse_dispersion_init,
        metavar="random|NUMBER"))
    dispersion_lr_multiplier: float = field(default=30.0, metadata=_opt(
        "--dispersion-lr-multiplier", "Learning rate of log theta (NB / ZINB with gene or gene-batch dispersion) "
        "relative to --lr (1: as scvi-tools, under which theta barely leaves its random start for tens of epochs; "
        "benchmarks/results/dispersion_lr.md).", min=0.0, min_open=True))
    dispersion_lr_decay: str | int = field(default=1000, metadata=_opt(
        "--dispersion-lr-decay", "Optimizer steps N over which the learning-rate multiplier of log theta falls "
        "linearly to 1 (default 1000); warmup: over the KL warm-up; none: --dispersion-lr-multiplier throughout.",
        parse=parse_dispersion_lr_decay, metavar="none|warmup|STEPS"))
    seed: int = field(default=0, metadata=_opt("--seed", "Seeds initialisation, split, minibatches and sampling."))
    progress_bar: bool = True
    n_threads: int | None = field(default=None, metadata=_opt(
        "--n-threads", "CPU threads for training (default: chosen by timing training steps at the idle cores and at "
        "all cores; fix it for bit-identical reruns).", min=1, max=1024))
    checkpoint_every: int = field(default=10, metadata=_opt(
        "--checkpoint-every", "Epochs between training checkpoints in --out/checkpoints (a crash loses at most this "
        "many).", min=1))
    max_bad_steps: int = field(default=20, metadata={"min": 1})
    check_finite: bool = True
    accelerator: str = field(default="auto", metadata=_opt(
        "--accelerator", "Device for training (auto: CUDA when available).", choices=ACCELERATORS))
    fused_optimizer: bool = True

    def __post_init__(self):
        object.__setattr__(self, "dispersion_init", parse_dispersion_init(self.dispersion_init))
        object.__setattr__(self, "dispersion_lr_decay", parse_dispersion_lr_decay(self.dispersion_lr_decay))
        _check_fields(self)
        if self.train_size > 1.0:
            raise CellvaeInputError(f"train_size must be in (0, 1], got {self.train_size}.")

    @property
    def warmup_epochs(self) -> int:
        """Epochs of the KL warm-up: ``n_epochs_kl_warmup``, else ``max(1, min(400, max_epochs // 2))``.

        Raises:
            ValueError: ``max_epochs`` is None and no warm-up length is set (resolve ``max_epochs`` first).
        """
        if self.n_epochs_kl_warmup is not None:
            return max(0, int(self.n_epochs_kl_warmup))
        if self.max_epochs is None:
            raise ValueError("warmup_epochs needs max_epochs (None: resolved from the number of cells).")
        return max(1, min(400, self.max_epochs // 2))


@dataclass(frozen=True)
class RNAProteinSettings(ModelSettings):
    """:class:`ModelSettings` of the joint RNA + protein model (:class:`cellvae.RNAProteinVAE`, totalVI class:
    Gayoso et al. 2021). The fields and defaults are the scVI module's, except:

    Attributes:
        gene_likelihood: ``"nb"`` (as scvi-tools' TOTALVI; ``"zinb"`` and ``"poisson"`` too).
        protein_dispersion: inverse dispersion phi of the protein NB mixture per ``"protein"`` or per
            ``"protein-batch"``.
    """

    gene_likelihood: str = field(default="nb", metadata=_opt("--gene-likelihood", choices=GENE_LIKELIHOODS))
    protein_dispersion: str = field(default="protein", metadata={"choices": PROTEIN_DISPERSIONS})


TrainingPlan = TrainSettings  # the name of cellvae <= 0.1 (same fields)


@dataclass(frozen=True)
class FitJobSettings:
    """What ``cellvae fit`` does around the model and its training.

    Attributes:
        n_top_genes: model only this many highly variable genes (seurat_v3 on counts; None: all genes).
        backed: train out of core (the .h5ad's matrix read from disk in row chunks; see ``docs/backed.md``).
        overwrite: replace the known outputs of an earlier job in the output directory.
        resume: continue an interrupted job in the output directory from its last checkpoint.
        semi_supervised: after the count VAE, train a label-transfer model (:class:`cellvae.LabelTransferVAE`,
            scANVI) from it on ``labels_key`` (needs it); the saved model is then that one, ready for
            ``cellvae map``.
        unlabeled_category: with ``semi_supervised``: the label value of cells without a label.
        architecture: ``"scvi"`` (the :class:`ModelSettings` as given), ``"arches"`` (those with
            :data:`ARCHES_SETTINGS`: a reference built for ``cellvae map``) or ``"auto"``: ``"arches"`` with
            ``semi_supervised``, else ``"scvi"``.
    """

    n_top_genes: int | None = field(default=None, metadata=_opt(
        "--n-top-genes", "Model only this many highly variable genes (seurat_v3 on counts).", min=1))
    backed: bool = field(default=False, metadata=_opt(
        "--backed", "Train out of core: read the .h5ad's matrix from disk in row chunks (CSR or dense X; see "
        "docs/backed.md). For data larger than memory."))
    overwrite: bool = field(default=False, metadata=_opt(
        "--overwrite", "Replace the outputs of an earlier job in an existing --out directory."))
    resume: bool = field(default=False, metadata=_opt(
        "--resume", "Continue an interrupted job in --out from its last checkpoint (same data and options; the "
        "result equals an uninterrupted run)."))
    semi_supervised: bool = field(default=False, metadata=_opt(
        "--semi-supervised", "With --labels-key: then train a label-transfer model (scANVI) from the count VAE; "
        "the saved model predicts labels and maps queries (cellvae map)."))
    unlabeled_category: str = field(default="Unknown", metadata=_opt(
        "--unlabeled-category", "With --semi-supervised: the --labels-key value of cells without a label."))
    architecture: str = field(default="auto", metadata=_opt(
        "--architecture", "scvi: scVI's encoder (batch norm, covariates in the decoder only); arches: scArches' "
        "reference architecture (covariates also in the encoder, layer norm), needed for cellvae map to correct a "
        "query's batch effect in the latent space; auto: arches with --semi-supervised, else scvi.",
        choices=ARCHITECTURES))

    def __post_init__(self):
        _check_fields(self)


# --------------------------------------------------------------------------------------- helpers
def cli_fields(cls) -> Iterator[dataclasses.Field]:
    """The fields of a settings class that ``cellvae fit`` exposes as options (those with a ``cli`` flag)."""
    return (f for f in dataclasses.fields(cls) if f.metadata.get("cli"))


def as_dict(settings) -> dict:
    """A settings object as a plain dict of its fields (tuples as lists: JSON-ready)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(settings).items()}


def from_dict(cls, values: dict | None, where: str = "settings"):
    """``cls(**values)`` for a dict read from a file or given by a caller; missing keys take their defaults.

    Raises:
        CellvaeInputError: unknown keys (named, with the known ones), or values the class refuses.
    """
    values = dict(values or {})
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise CellvaeInputError(f"Unknown {where} {unknown}; known: {sorted(names)}.")
    return cls(**values)


def build(cls, settings=None, overrides: dict | None = None, where: str = "settings"):
    """``settings`` (an instance of ``cls`` or None for the defaults) with the keyword ``overrides`` applied.

    Raises:
        CellvaeInputError: ``settings`` of another type, unknown keywords, or refused values.
    """
    if settings is not None and not isinstance(settings, cls):
        raise CellvaeInputError(f"{where} must be a {cls.__name__}, got {type(settings).__name__}.")
    overrides = dict(overrides or {})
    if settings is None:
        return from_dict(cls, overrides, where)
    return from_dict(cls, {**dataclasses.asdict(settings), **overrides}, where) if overrides else settings


def with_signature(*classes, keep: int | None = None) -> Callable[[Callable], Callable]:
    """Decorator: give a function that takes ``**kwargs`` for the fields of ``classes`` a signature that lists those
    fields with their defaults (for ``help()``, IDEs and the API reference), after its own first ``keep`` explicit
    parameters (all of them when None). The defaults stay written once, in the dataclasses."""

    def deco(fn):
        sig = inspect.signature(fn)
        own = [p for p in sig.parameters.values() if p.kind != inspect.Parameter.VAR_KEYWORD]
        head = own if keep is None else own[:keep]
        tail = [] if keep is None else own[keep:]
        names = {p.name for p in own}
        extra = []
        for cls in classes:
            for f in dataclasses.fields(cls):
                if f.name in names:
                    continue
                names.add(f.name)
                extra.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default,
                                               annotation=f.type))
        tail = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) if p.kind == inspect.Parameter.POSITIONAL_OR_KEYWORD
                else p for p in tail]
        fn.__signature__ = sig.replace(parameters=[*head, *extra, *tail])
        return fn

    return deco
