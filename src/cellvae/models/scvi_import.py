"""Import a model trained and saved by scvi-tools (``SCVI.save``, scvi-tools 1.x) as a :class:`cellvae.CountVAE`,
without scvi-tools installed: :func:`read_scvi_file` and :func:`count_vae_from_scvi` (``CountVAE.from_scvi``).

The directory holds ``model.pt`` (``{prefix}model.pt``), a ``torch.save`` of ``{"model_state_dict", "var_names",
"attr_dict"}``: the module's weights, the genes, and the model's attributes (``init_params_``: the arguments of
``SCVI(...)``; ``registry_``: ``setup_anndata``'s arguments and the covariate categories). It is read with
``torch.load(weights_only=True)``: nothing in the file is executed. numpy arrays (gene names, categories) are
allowed through; objects of any other class (pandas DataFrames of the training history, ...) are replaced by an
inert placeholder and never built, and ``collections.defaultdict`` becomes a plain dict.

The weights map one to one onto :class:`cellvae.vae.module.VAEModule` (the architectures are the same, Lopez et
al. 2018): scvi-tools' ``FCLayers`` take the one-hot covariates as extra input columns of each linear layer, which
become cellvae's covariate embedding rows (:class:`cellvae.vae.nn.CovariateLinear`); continuous covariates are
extra input columns of the first layer only, so cellvae's continuous weights of deeper layers are set to zero;
``px_r`` of ``"gene-batch"`` is stored (n_genes, n_batch) there and (n_batch, n_genes) here. The result has the
same latent representation and likelihood (``tests/test_from_scvi.py``: latent to 1e-4, ELBO to 1e-3 relative,
against values recorded from scvi-tools 1.5.1).

Supported: ``SCVI`` set up with ``setup_anndata`` (``layer``, ``batch_key``, ``categorical_covariate_keys``,
``continuous_covariate_keys``; ``labels_key`` is ignored), gene likelihoods ``"zinb"``, ``"nb"``, ``"poisson"``,
dispersion ``"gene"``, ``"gene-batch"``, ``"gene-cell"``, observed or latent library size, any ``n_hidden``,
``n_latent``, ``n_layers``, ``dropout_rate``, ``use_batch_norm``, ``use_layer_norm``, ``encode_covariates``,
``deeply_inject_covariates``. Anything else is refused with a :class:`cellvae.CellvaeInputError` that names it.
"""

from __future__ import annotations

import io
import os
import pickle
import re
from pathlib import Path

import anndata as ad
import numpy as np
import torch

from ..data.fileio import zip_damage
from ..data.spec import DataSpec
from ..errors import CellvaeInputError
from ..settings import ModelSettings

__all__ = ["read_scvi_file", "count_vae_from_scvi", "SCVI_MODEL_FILE"]

SCVI_MODEL_FILE = "model.pt"
_MAX_STUBS = 64
_SAFE_BUILTINS = (slice, dict, list, tuple, set, frozenset, bytes, bytearray, complex, range, int, float, str, bool)
# scvi-tools SCVI / VAE arguments cellvae reproduces, with scvi-tools' defaults
_SCVI_DEFAULTS = {
    "n_hidden": 128, "n_latent": 10, "n_layers": 1, "dropout_rate": 0.1, "dispersion": "gene",
    "gene_likelihood": "zinb", "use_observed_lib_size": True, "latent_distribution": "normal",
    "log_variational": True, "encode_covariates": False, "deeply_inject_covariates": True,
    "batch_representation": "one-hot", "use_batch_norm": "both", "use_layer_norm": "none",
    "use_size_factor_key": False, "var_activation": None, "extra_encoder_kwargs": None,
    "extra_decoder_kwargs": None, "batch_embedding_kwargs": None, "extra_payload_autotune": False,
}
_REQUIRED = {  # argument: (value cellvae needs, what to do instead)
    "latent_distribution": ("normal", "a logistic-normal latent ('ln') has no cellvae counterpart"),
    "log_variational": (True, "cellvae's encoder always reads log1p(counts)"),
    "batch_representation": ("one-hot", "cellvae injects batches as one-hot rows (embedding rows of one-hot "
                                        "columns), not as learned batch embeddings"),
    "use_size_factor_key": (False, "cellvae has no size-factor library"),
    "var_activation": (None, "cellvae's encoder variance is exp(.) + 1e-4"),
    "extra_encoder_kwargs": (None, "extra encoder arguments change the architecture"),
    "extra_decoder_kwargs": (None, "extra decoder arguments change the architecture"),
    "batch_embedding_kwargs": (None, "batch embeddings are not supported"),
}


class _NotRead:
    """Placeholder for an object of a class that is not read from an scvi-tools file (its state is dropped)."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass

    def __repr__(self) -> str:
        return f"<{type(self).__name__}: not read>"


def _plain_dict(*args) -> dict:
    """Stands in for ``collections.defaultdict(factory)`` while unpickling: the items are kept, the factory not."""
    return {}


def _numpy_globals() -> list:
    """numpy's array reconstruction and dtype classes, under the names numpy 1 and numpy 2 pickle them with."""
    import numpy.dtypes as ndt

    core = getattr(np, "_core", None) or np.core
    out = [core.multiarray._reconstruct, np.ndarray, np.dtype, *_SAFE_BUILTINS,
           (core.multiarray._reconstruct, "numpy.core.multiarray._reconstruct"),
           (core.multiarray._reconstruct, "numpy._core.multiarray._reconstruct"),
           (core.multiarray.scalar, "numpy.core.multiarray.scalar"),
           (core.multiarray.scalar, "numpy._core.multiarray.scalar")]
    out += [getattr(ndt, n) for n in getattr(ndt, "__all__", []) if isinstance(getattr(ndt, n, None), type)]
    return out


def read_scvi_file(path: str | os.PathLike) -> tuple[dict, list[str]]:
    """The contents of an scvi-tools ``model.pt`` read with ``torch.load(weights_only=True)``.

    Objects of classes other than tensors, numpy arrays and plain containers are replaced by inert placeholders
    (never constructed), one class at a time as the loader names them (at most 64 classes).

    Args:
        path: the ``model.pt`` file.

    Returns:
        ``(contents, placeholders)``: the dict saved by scvi-tools, and the names of the classes that were
        replaced (e.g. ``pandas.DataFrame`` of the training history).

    Raises:
        CellvaeInputError: no such file, a damaged zip archive, or a file that torch cannot read.
    """
    path = Path(path)
    if not path.is_file():
        raise CellvaeInputError(f"{str(path)!r} does not exist: pass the directory written by scvi-tools' "
                                "model.save(dir) (it holds model.pt).")
    data = path.read_bytes()
    damage = zip_damage(data)
    if damage:
        raise CellvaeInputError(f"{str(path)!r} is damaged ({damage}); copy the scvi-tools model again.")
    stubs: dict[str, object] = {"collections.defaultdict": _plain_dict}
    base = _numpy_globals()
    for _ in range(_MAX_STUBS):
        allowed = base + [(obj, name) for name, obj in stubs.items()]
        try:
            with torch.serialization.safe_globals(allowed):
                contents = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
            break
        except pickle.UnpicklingError as e:
            m = (re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
                 or re.search(r"but got <class '([\w.]+)'>", str(e)))
            name = m.group(1) if m else None
            if name is None or name in stubs or "." not in name:
                first = (str(e).strip().splitlines() or [type(e).__name__])[-1][:300]
                raise CellvaeInputError(f"{str(path)!r} cannot be read as an scvi-tools model without executing "
                                        f"code from it ({first}).") from e
            stubs[name] = type(name.rpartition(".")[2], (_NotRead,), {"__module__": __name__})
        except Exception as e:  # noqa: BLE001 - not a torch file, truncated
            raise CellvaeInputError(f"{str(path)!r} is not a model file torch can read ({type(e).__name__}: "
                                    f"{str(e)[:200]}).") from e
    else:
        raise CellvaeInputError(f"{str(path)!r} holds objects of more than {_MAX_STUBS} classes; not an scvi-tools "
                                "model file.")
    if not isinstance(contents, dict):
        raise CellvaeInputError(f"{str(path)!r} does not hold an scvi-tools model (a dict).")
    return contents, sorted(n for n in stubs if n != "collections.defaultdict")


# ------------------------------------------------------------------------------------------- settings
def _module_arguments(attr: dict) -> dict:
    """The arguments of ``SCVI(...)`` (scvi-tools' ``init_params_``) with scvi-tools' defaults filled in."""
    init = attr.get("init_params_")
    if not isinstance(init, dict):
        raise CellvaeInputError("The scvi-tools file has no init_params_ (the model's arguments); it is not a "
                                "model saved by scvi-tools 1.x SCVI.save.")
    args = dict(init.get("non_kwargs") or {})
    kwargs = dict(init.get("kwargs") or {})
    args.update(kwargs.pop("kwargs", None) or {})
    args.update(kwargs)
    unknown = sorted(set(args) - set(_SCVI_DEFAULTS))
    if unknown:
        raise CellvaeInputError(f"The scvi-tools model was made with arguments cellvae does not reproduce: "
                                f"{unknown}. Supported: {sorted(_SCVI_DEFAULTS)}.")
    return {**_SCVI_DEFAULTS, **args}


def _check_supported(args: dict, registry: dict) -> None:
    """Refuse the parts of an scvi-tools model cellvae cannot reproduce, naming each."""
    name = registry.get("model_name")
    if name != "SCVI":
        raise CellvaeInputError(f"The scvi-tools model is a {name!r}; CountVAE.from_scvi imports SCVI models only "
                                "(model_name 'SCVI' in the saved registry).")
    method = registry.get("setup_method_name", "setup_anndata")
    if method != "setup_anndata":
        raise CellvaeInputError(f"The scvi-tools model was set up with {method!r}; only setup_anndata (one AnnData) "
                                "is supported.")
    if args["gene_likelihood"] not in ("zinb", "nb", "poisson"):
        raise CellvaeInputError(f"gene_likelihood={args['gene_likelihood']!r} of the scvi-tools model is not "
                                "supported (scvi-tools' 'normal' is a Gaussian on the count scale, not cellvae's "
                                "Gaussian on log1p-normalized data); supported: 'zinb', 'nb', 'poisson'.")
    if args["dispersion"] not in ("gene", "gene-batch", "gene-cell"):
        raise CellvaeInputError(f"dispersion={args['dispersion']!r} of the scvi-tools model is not supported "
                                "(cellvae has 'gene', 'gene-batch' and 'gene-cell').")
    for key, (want, why) in _REQUIRED.items():
        have = args.get(key)
        if have != want and not (want is None and have in ({}, None)):
            raise CellvaeInputError(f"{key}={have!r} of the scvi-tools model is not supported ({why}); cellvae "
                                    f"needs {key}={want!r}.")
    setup = registry.get("setup_args") or {}
    if setup.get("size_factor_key"):
        raise CellvaeInputError(f"size_factor_key={setup['size_factor_key']!r} of the scvi-tools model is not "
                                "supported: cellvae's library size is observed (total counts) or latent.")


def _spec_and_settings(contents: dict, args: dict) -> tuple[DataSpec, ModelSettings]:
    attr = contents["attr_dict"]
    registry = attr["registry_"]
    setup = registry.get("setup_args") or {}
    fields = registry.get("field_registries") or {}
    var_names = contents.get("var_names")
    if isinstance(var_names, dict):
        raise CellvaeInputError("The scvi-tools model was trained on a MuData (var_names per modality); only "
                                "AnnData models are supported.")
    genes = [str(g) for g in np.asarray(var_names).ravel()]
    batch_key = setup.get("batch_key")
    batch_state = (fields.get("batch") or {}).get("state_registry") or {}
    batch_cats = [str(c) for c in np.asarray(batch_state.get("categorical_mapping", ["0"])).ravel()]
    if not batch_key:
        batch_cats = ["0"]
    cat_state = (fields.get("extra_categorical_covs") or {}).get("state_registry") or {}
    cat_keys = [str(k) for k in (cat_state.get("field_keys") or setup.get("categorical_covariate_keys") or [])]
    mappings = cat_state.get("mappings") or {}
    cat_cats = {k: [str(c) for c in np.asarray(mappings[k]).ravel()] for k in cat_keys}
    cont_state = (fields.get("extra_continuous_covs") or {}).get("state_registry") or {}
    cont_keys = [str(k) for k in np.asarray(cont_state.get("columns", setup.get("continuous_covariate_keys") or
                                                           [])).ravel()]
    spec = DataSpec(gene_names=genes, layer=setup.get("layer"), gene_likelihood=args["gene_likelihood"],
                    batch_key=batch_key, categorical_covariate_keys=cat_keys, continuous_covariate_keys=cont_keys,
                    batch_categories=batch_cats, categorical_categories=cat_cats)
    settings = ModelSettings(
        gene_likelihood=args["gene_likelihood"], dispersion=args["dispersion"], n_hidden=int(args["n_hidden"]),
        n_latent=int(args["n_latent"]), n_layers=int(args["n_layers"]), dropout_rate=float(args["dropout_rate"]),
        use_observed_lib_size=bool(args["use_observed_lib_size"]), encode_covariates=bool(args["encode_covariates"]),
        deeply_inject_covariates=bool(args["deeply_inject_covariates"]), use_batch_norm=args["use_batch_norm"],
        use_layer_norm=args["use_layer_norm"])
    return spec, settings


# --------------------------------------------------------------------------------------------- weights
def _fc_layers(state: dict, src: str, dst: str, fc, first_cont_in_scvi: bool, out: dict, used: set) -> None:
    """Map scvi-tools ``FCLayers`` weights under ``src`` onto cellvae's :class:`cellvae.vae.nn.FCLayers` ``fc``
    under ``dst``: the linear weight's columns split into the main input, the continuous covariates (first layer,
    when scvi-tools has them there; zero elsewhere) and the one-hot categorical columns (embedding rows)."""
    for i, cl in enumerate(fc.linears):
        key = f"{src}.fc_layers.Layer {i}.0.weight"
        if key not in state:
            raise CellvaeInputError(f"The scvi-tools weights lack {key!r}: the file does not match its own settings.")
        w = state[key]
        used.add(key)
        n_in = cl.linear.in_features
        off = n_in
        out[f"{dst}.linears.{i}.linear.weight"] = w[:, :n_in]
        if cl.cont is not None:
            n_cont = cl.cont.in_features
            if i == 0 and first_cont_in_scvi:
                out[f"{dst}.linears.{i}.cont.weight"] = w[:, off:off + n_cont]
                off += n_cont
            else:  # scvi-tools feeds continuous covariates to the first layer only
                out[f"{dst}.linears.{i}.cont.weight"] = torch.zeros(w.shape[0], n_cont, dtype=w.dtype)
        for j, emb in enumerate(cl.embeddings):
            k = emb.num_embeddings
            out[f"{dst}.linears.{i}.embeddings.{j}.weight"] = w[:, off:off + k].t()
            off += k
        if off != w.shape[1]:
            raise CellvaeInputError(f"{key!r} has {w.shape[1]} input columns, cellvae expects {off} from the saved "
                                    "settings and covariates.")
        for leaf in ("bias",):
            k = f"{src}.fc_layers.Layer {i}.0.{leaf}"
            if k in state:
                out[f"{dst}.linears.{i}.linear.{leaf}"] = state[k]
                used.add(k)
        for leaf in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            k = f"{src}.fc_layers.Layer {i}.1.{leaf}"
            if k in state:
                out[f"{dst}.post.{i}.0.{leaf}"] = state[k]
                used.add(k)


def _copy(state: dict, pairs: dict, out: dict, used: set) -> None:
    for s, d in pairs.items():
        if s not in state:
            raise CellvaeInputError(f"The scvi-tools weights lack {s!r}: the file does not match its own settings.")
        out[d] = state[s]
        used.add(s)


def map_scvi_state(state: dict, module) -> dict:
    """A cellvae state dict for ``module`` (a :class:`cellvae.vae.module.VAEModule` built with the scvi-tools model's
    settings) from the scvi-tools ``VAE`` state dict ``state``.

    Raises:
        CellvaeInputError: scvi-tools weights that cellvae cannot place (named), or ones that are missing.
    """
    out: dict = {}
    used: set = {"pyro_param_store"}
    enc_cont = module.encode_covariates
    _fc_layers(state, "z_encoder.encoder", "z_encoder.encoder", module.z_encoder.encoder, enc_cont, out, used)
    _copy(state, {f"z_encoder.{h}_encoder.{p}": f"z_encoder.{h}_encoder.{p}" for h in ("mean", "var")
                  for p in ("weight", "bias")}, out, used)
    if module.use_observed_lib_size:
        used |= {k for k in state if k.startswith("l_encoder.")}  # scvi-tools builds it but never uses it then
    else:
        _fc_layers(state, "l_encoder.encoder", "l_encoder.encoder", module.l_encoder.encoder, enc_cont, out, used)
        _copy(state, {f"l_encoder.{h}_encoder.{p}": f"l_encoder.{h}_encoder.{p}" for h in ("mean", "var")
                      for p in ("weight", "bias")}, out, used)
        _copy(state, {"library_log_means": "library_log_means", "library_log_vars": "library_log_vars"}, out, used)
        out["library_log_means"] = out["library_log_means"].reshape(-1)
        out["library_log_vars"] = out["library_log_vars"].reshape(-1)
    _fc_layers(state, "decoder.px_decoder", "decoder.px_decoder", module.decoder.px_decoder, True, out, used)
    _copy(state, {"decoder.px_scale_decoder.0.weight": "decoder.scale_decoder.weight",
                  "decoder.px_scale_decoder.0.bias": "decoder.scale_decoder.bias",
                  "decoder.px_dropout_decoder.weight": "decoder.dropout_decoder.weight",
                  "decoder.px_dropout_decoder.bias": "decoder.dropout_decoder.bias"}, out, used)
    if module.dispersion == "gene-cell":
        _copy(state, {"decoder.px_r_decoder.weight": "decoder.dispersion_decoder.weight",
                      "decoder.px_r_decoder.bias": "decoder.dispersion_decoder.bias"}, out, used)
    else:
        used |= {k for k in state if k.startswith("decoder.px_r_decoder.")}  # unused for gene / gene-batch
        _copy(state, {"px_r": "px_r"}, out, used)
        if module.dispersion == "gene-batch":
            out["px_r"] = out["px_r"].t().contiguous()  # scvi-tools: (n_genes, n_batch)
    left = sorted(set(state) - used)
    if left:
        raise CellvaeInputError(f"The scvi-tools model has weights cellvae cannot place: {left[:5]}"
                                f"{' ...' if len(left) > 5 else ''}; its architecture differs from SCVI's.")
    want = module.state_dict()
    missing = sorted(set(want) - set(out))
    if missing:
        raise CellvaeInputError(f"cellvae weights not set from the scvi-tools model: {missing[:5]}.")
    for k, v in out.items():
        if not isinstance(v, torch.Tensor) or tuple(v.shape) != tuple(want[k].shape):
            got = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
            raise CellvaeInputError(f"scvi-tools weight for {k!r} has shape {got}, cellvae expects "
                                    f"{tuple(want[k].shape)}; the file does not match its own settings.")
    return {k: v.to(want[k].dtype) for k, v in out.items()}


# ------------------------------------------------------------------------------------------------ model
def count_vae_from_scvi(cls, path: str | os.PathLike, adata: ad.AnnData | None = None, prefix: str | None = None):
    """A trained ``cls`` (:class:`cellvae.CountVAE`) with the weights of an scvi-tools ``SCVI`` saved in ``path``
    (see the module docstring). Used by :meth:`cellvae.CountVAE.from_scvi`.

    Raises:
        CellvaeInputError: a missing or unreadable file, an unsupported model or setting (named), weights that do
            not match the settings, or ``adata`` without the model's genes.
    """
    p = Path(path).expanduser()
    file = p / f"{prefix or ''}{SCVI_MODEL_FILE}" if p.is_dir() else p
    contents, _ = read_scvi_file(file)
    for key in ("model_state_dict", "var_names", "attr_dict"):
        if key not in contents:
            raise CellvaeInputError(f"{str(file)!r} lacks {key!r}: not a model saved by scvi-tools 1.x SCVI.save "
                                    "(older saves: convert them with scvi-tools' convert_legacy_save first).")
    attr = contents["attr_dict"]
    registry = attr.get("registry_") if isinstance(attr, dict) else None
    if not isinstance(registry, dict):
        raise CellvaeInputError(f"{str(file)!r} has no registry_ in its attr_dict: not saved by scvi-tools 1.x.")
    args = _module_arguments(attr)
    _check_supported(args, registry)
    spec, settings = _spec_and_settings(contents, args)
    state = {k: v for k, v in contents["model_state_dict"].items() if isinstance(v, torch.Tensor)}

    self = cls.__new__(cls)
    self.settings, self.spec, self.labels_key = settings, spec, None
    self.adata, self._data, self.out_of_core, self._summary = None, None, False, None
    self.history = {"imported_from": {"tool": "scvi-tools", "model": "SCVI",
                                      "version": str(registry.get("scvi_version", "?")), "path": str(file)}}
    self._saved_split, self.reference, self._train_cells = None, None, None
    self.train_indices = self.validation_indices = None
    lib = (state.get("library_log_means"), state.get("library_log_vars"))
    lib = tuple(None if v is None else v.reshape(-1).numpy() for v in lib)
    self.module = self._build_module(*lib)
    self.module.load_state_dict(map_scvi_state(state, self.module))
    self.module.eval()
    self.is_trained = bool(attr.get("is_trained_", True))
    if adata is not None:
        spec.gene_indexer(adata)  # the model's genes must be there
        self.adata = adata
    return self
