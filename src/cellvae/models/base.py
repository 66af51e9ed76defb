"""What every model shares: the trained-check, save/load with format versions, migrations and checksums, and for
models of an AnnData the prepared tensors of a set of cells (the public model protocol of
:mod:`cellvae.analysis.protocol`).

A saved model is a directory (``docs/model_format.md``):

- ``config.json``: ``format_version``, ``cellvae_version``, ``model_class``, ``is_trained``, the model's own
  entries (:meth:`BaseModel._config`), and ``files``: the SHA-256 of every other file, checked on load (bit rot,
  a truncated copy or an edited file is refused with a clear message instead of loading garbage weights);
- ``model.pt``: the module's state dict (tensors only, read with ``torch.load(weights_only=True)``: no code is
  ever unpickled);
- ``history.json``: the training history; further files of the model (e.g. ``split.json``).

Every file is written and fsynced in a temporary directory beside the target, which is then renamed onto it: a
crash never leaves a half-written or mixed model.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
from pathlib import Path
from typing import Callable, ClassVar

import anndata as ad
import numpy as np
import torch

from .._version import __version__
from ..data.fileio import atomic_directory, plain, write_synced, zip_damage
from ..data.spec import DataSpec
from ..data.tensors import as_indices
from ..errors import CellvaeInputError, warn

__all__ = ["BaseModel", "AnnDataModel", "read_config", "migrate_config", "read_weights", "split_positions"]

CONFIG = "config.json"
WEIGHTS = "model.pt"
HISTORY = "history.json"
SPLIT = "split.json"
MAX_CONFIG_BYTES = 64 << 20  # a config.json larger than this is not one of ours (gene names: ~30 bytes each)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_config(d: Path, model_class: str, format_version: int,
                migrations: dict[int, Callable[[dict], dict]]) -> dict:
    """The config of the model directory ``d``, brought up to ``format_version`` one version at a time.

    A config without ``format_version`` is format 0. Each migration is a pure function of the JSON config (weights
    are never rewritten); see ``docs/model_format.md``.

    Raises:
        CellvaeInputError: not a model directory, damaged or not JSON, another model class, a version newer than
            this cellvae supports, or not a version number.
    """
    path = d / CONFIG
    if not path.exists() or not (d / WEIGHTS).exists():
        what = "a cellvae model directory" if model_class == "CountVAE" else f"an {model_class} model directory"
        job = {"CountVAE": "cellvae fit", "ImageVAE": "cellvae fit-images"}.get(model_class)
        raise CellvaeInputError(
            f"{str(d)!r} is not {what} (needs {CONFIG} and {WEIGHTS}); pass the directory written by "
            f"{model_class}.save" + (f" (for `{job}`: OUT/model)." if job else ".")
        )
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise CellvaeInputError(f"{str(path)!r} is {path.stat().st_size} bytes, not a cellvae model config; the "
                                "model directory is damaged: save or train the model again.")
    try:
        cfg = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise CellvaeInputError(f"{str(path)!r} is not valid JSON ({e}); the model directory is damaged: save or "
                                "train the model again.") from e
    if not isinstance(cfg, dict):
        raise CellvaeInputError(f"{str(path)!r} does not hold a cellvae model config (a JSON object).")
    cfg = migrate_config(cfg, format_version, migrations, where=str(path))
    found = cfg.get("model_class", model_class)
    if found != model_class:
        raise CellvaeInputError(f"{str(d)!r} holds a {found!r}, not a {model_class}; load it with its own class "
                                f"(e.g. cellvae.{found}.load).")
    return cfg


def migrate_config(cfg: dict, format_version: int, migrations: dict[int, Callable[[dict], dict]],
                   where: str = CONFIG) -> dict:
    """A model config (a dict read from ``config.json``) brought up to ``format_version`` one version at a time,
    without changing ``cfg``. A config without ``format_version`` is format 0; each migration is a pure function of
    the JSON config (weights are never rewritten).

    Raises:
        CellvaeInputError: a version newer than ``format_version``, negative, or not a whole number.
    """
    raw = cfg.get("format_version", 0)
    if isinstance(raw, bool) or not isinstance(raw, (int, float)) or not float(raw).is_integer():
        raise CellvaeInputError(f"{where}: format_version {raw!r} is not a version number; the model directory is "
                                "damaged: save the model again.")
    version = int(raw)
    if version > format_version:
        raise CellvaeInputError(
            f"Model format version {version} is newer than this cellvae supports ({format_version}); upgrade "
            "cellvae (pip install -U cellvae) to load it."
        )
    if version < 0:
        raise CellvaeInputError(f"{where}: format_version {version} is not a cellvae format.")
    while version < format_version:
        cfg = migrations[version](cfg)
        version += 1
    return cfg


def read_weights(d: Path, cfg: dict) -> dict:
    """The state dict in ``d/model.pt``, checked against the SHA-256 that ``config.json`` recorded (when it did).

    Raises:
        CellvaeInputError: a checksum mismatch (bit rot, a truncated copy or an edited file), a file torch cannot
            read, pickled objects other than tensors, or anything but a dict of tensors.
    """
    path = d / WEIGHTS
    data = path.read_bytes()
    want = (cfg.get("files") or {}).get(WEIGHTS)
    damage = ("its SHA-256 differs from the one recorded in config.json when it was saved"
              if isinstance(want, str) and _sha256(data) != want else zip_damage(data))
    if damage:
        raise CellvaeInputError(
            f"{str(path)!r} is damaged: {damage} (bit rot, a truncated copy or an edited file). Copy the model "
            "directory again from a good source, or train the model again."
        )
    try:
        state = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    except Exception as e:  # noqa: BLE001 - unreadable, truncated, or pickled objects other than tensors
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise CellvaeInputError(
            f"{str(path)!r} cannot be loaded as plain weights ({type(e).__name__}: {first}). It is damaged, or holds "
            "pickled objects other than tensors, which cellvae never loads; save the model again."
        ) from e
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CellvaeInputError(f"{str(path)!r} is not a state dict of tensors; save the model again.")
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise CellvaeInputError(f"{str(path)!r} holds non-finite weights ({bad[:3]}); the file is damaged or the "
                                "model diverged: train the model again.")
    return state


def _state_mismatch(e: RuntimeError) -> str:
    """The first difference of a failed ``load_state_dict``, briefly, and how many there are."""
    lines = [ln.strip().rstrip(".") for ln in str(e).splitlines()[1:] if ln.strip()]
    parts = []
    for ln in lines:
        m = re.match(r"size mismatch for (\S+): copying a param with shape torch\.Size\((\[.*?\])\) from checkpoint, "
                     r"the shape in current model is torch\.Size\((\[.*?\])\)", ln)
        parts.append(f"{m.group(1)} has shape {m.group(2)} in the file but {m.group(3)} by the config" if m else ln)
    if not parts:
        return str(e).splitlines()[0][:200]
    more = f"; {len(parts) - 1} more differences" if len(parts) > 1 else ""
    return parts[0][:300] + more


def split_positions(split: dict | None, adata: ad.AnnData) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Positions in ``adata`` of a saved split's training and validation cells, matched by obs name (sorted);
    (None, None) unless all of them are found and the names are unique."""
    names = adata.obs_names.astype(str)
    if not isinstance(split, dict) or not names.is_unique:
        return None, None
    pos = [names.get_indexer([str(n) for n in split.get(k, [])]) for k in ("train", "validation")]
    if any((p < 0).any() for p in pos):
        return None, None
    return np.sort(pos[0]), np.sort(pos[1])


class BaseModel:
    """A trained (or to-be-trained) module with its history, saved and loaded as a model directory.

    Subclasses set :attr:`module` and implement :meth:`_config` (their entries of ``config.json``) and
    :meth:`_from_config` (a model with its module built from a config, before the weights are loaded); they may
    add files (:meth:`_extra_files`) and read them back (:meth:`_after_load`), and list format migrations in
    :attr:`MIGRATIONS`.

    Attributes:
        module: the torch module.
        history: per-epoch training history (empty until trained).
        is_trained: whether training ran (or a trained model was loaded).
        train_indices, validation_indices: positions of the training and held-out cells of the last training
            (None when unknown).
    """

    FORMAT_VERSION: ClassVar[int] = 1
    MIGRATIONS: ClassVar[dict[int, Callable[[dict], dict]]] = {}

    module: torch.nn.Module
    history: dict
    is_trained: bool = False
    train_indices: np.ndarray | None = None
    validation_indices: np.ndarray | None = None

    def check_trained(self) -> None:
        """Warn (``UserWarning``) when the model has not been trained: its results come from random weights."""
        if not self.is_trained:
            warn("The model has not been trained; results come from random weights. Call .train() first.")

    # ------------------------------------------------------------------------------------- save / load
    def _config(self) -> dict:
        """The model's own entries of ``config.json`` (JSON-ready)."""
        raise NotImplementedError

    def _extra_files(self) -> dict[str, bytes]:
        """Further files of the model directory, by name."""
        return {}

    @classmethod
    def _from_config(cls, cfg: dict, state: dict, directory: Path, **kwargs) -> "BaseModel":
        """A model whose module is built from ``cfg`` (its weights are loaded afterwards)."""
        raise NotImplementedError

    def _after_load(self, directory: Path, cfg: dict, **kwargs) -> None:
        """Read the model's further files after the weights are loaded."""

    def save(self, dir_path: str | os.PathLike, overwrite: bool = False) -> Path:
        """Save to a directory: ``config.json`` (format version, settings, SHA-256 of the other files), ``model.pt``
        (a plain state dict, loadable with ``torch.load(weights_only=True)``), ``history.json`` and the model's own
        files. Written into a temporary directory beside the target (each file fsynced) and renamed, so a crash
        never leaves a half-written model. The format is described in ``docs/model_format.md``.

        Raises:
            FileExistsError: the directory exists and ``overwrite`` is False.
        """
        buf = io.BytesIO()
        torch.save({k: v.detach().cpu() for k, v in self.module.state_dict().items()}, buf)
        files = {WEIGHTS: buf.getvalue(), HISTORY: json.dumps(plain(self.history)).encode(), **self._extra_files()}
        cfg = {"format_version": self.FORMAT_VERSION, "cellvae_version": __version__,
               "model_class": type(self).__name__, **plain(self._config()), "is_trained": bool(self.is_trained),
               "files": {name: _sha256(data) for name, data in files.items()}}
        with atomic_directory(Path(dir_path), overwrite) as tmp:
            for name, data in files.items():
                write_synced(tmp / name, data)
            write_synced(tmp / CONFIG, json.dumps(cfg, indent=2).encode())
        return Path(dir_path)

    @classmethod
    def _class_in(cls, d: Path) -> type:
        """The class to load ``d`` with: the subclass of ``cls`` named by its config's ``model_class`` (so that
        ``CountVAE.load`` loads a saved :class:`cellvae.LabelTransferVAE`), else ``cls`` (whose checks then report
        what is wrong)."""
        try:
            if (d / CONFIG).stat().st_size > MAX_CONFIG_BYTES:
                return cls
            name = json.loads((d / CONFIG).read_text()).get("model_class")
        except (OSError, ValueError, UnicodeDecodeError, AttributeError):
            return cls
        todo = list(cls.__subclasses__())
        while todo:
            sub = todo.pop()
            if sub.__name__ == name:
                return sub
            todo.extend(sub.__subclasses__())
        return cls

    @classmethod
    def load(cls, dir_path: str | os.PathLike, **kwargs):
        """Load a model saved by :meth:`save` (and by older cellvae versions: their formats are migrated). A
        directory that holds a subclass of this class (by ``model_class``) loads as that subclass.

        Raises:
            CellvaeInputError: missing files, a newer format version, another model class, a damaged file (its
                SHA-256 differs from the recorded one), weights that do not match the config.
        """
        d = Path(dir_path).expanduser()
        cls = cls._class_in(d)
        cfg = read_config(d, cls.__name__, cls.FORMAT_VERSION, cls.MIGRATIONS)
        state = read_weights(d, cfg)
        try:
            self = cls._from_config(cfg, state, d, **kwargs)
        except (KeyError, TypeError, AttributeError) as e:
            raise CellvaeInputError(f"{str(d / CONFIG)!r} lacks or has a malformed entry ({e}); the model directory "
                                    "is damaged: save or train the model again.") from e
        except CellvaeInputError as e:
            raise CellvaeInputError(f"The settings in {str(d / CONFIG)!r} cannot build a model: {e}") from e
        try:
            self.module.load_state_dict(state)
        except RuntimeError as e:
            raise CellvaeInputError(
                f"Weights in {str(d / WEIGHTS)!r} do not match its config ({_state_mismatch(e)}). The files of the "
                "directory come from different models, or were edited; save the model again."
            ) from e
        self.module.eval()
        self.history = _read_json(d / HISTORY, cfg, default={})
        self.is_trained = bool(cfg.get("is_trained", True))
        self._after_load(d, cfg, **kwargs)
        return self


def _read_json(path: Path, cfg: dict, default=None):
    """A JSON file of a model directory (``default`` when absent), checked against its recorded SHA-256.

    Raises:
        CellvaeInputError: damaged (checksum or JSON).
    """
    if not path.exists():
        return default
    data = path.read_bytes()
    want = (cfg.get("files") or {}).get(path.name)
    try:
        if isinstance(want, str) and _sha256(data) != want:
            raise ValueError("its SHA-256 differs from the one recorded in config.json")
        return json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise CellvaeInputError(f"{str(path)!r} is damaged ({e}); copy the model directory again, or delete "
                                f"{path.name} to load the model without it.") from e


class AnnDataModel(BaseModel):
    """A model of the cells of an AnnData: the public model protocol of :mod:`cellvae.analysis.protocol`.

    Attributes:
        spec: the :class:`cellvae.data.DataSpec` (genes, layer, covariate encodings) fixed at training.
        adata: the attached AnnData (None after :meth:`load` without one).
        labels_key: obs column of known labels, or None.
    """

    spec: DataSpec
    adata: ad.AnnData | None = None
    labels_key: str | None = None
    _data = None
    _saved_split: dict | None = None

    def _prepare(self, adata: ad.AnnData):
        """The prepared tensors of ``adata`` (:meth:`cellvae.data.DataSpec.prepare`; subclasses may read out of
        core)."""
        return self.spec.prepare(adata)

    def prepared_data(self, adata: ad.AnnData | None = None):
        """Prepared tensors of every cell of ``adata`` (None: the attached AnnData, prepared once and kept): a
        :class:`cellvae.data.TensorData` in memory, or a :class:`cellvae.data.BackedData` read from disk. Genes are
        matched to the model's by name.

        Raises:
            CellvaeInputError: no AnnData attached and none given, genes of the model missing, bad values,
                unknown covariate categories.
        """
        if adata is None and self.adata is None:
            raise CellvaeInputError("No AnnData attached to this model: pass adata=... to this method.")
        if adata is None or adata is self.adata:
            if self._data is None:
                self._data = self._prepare(self.adata)
            return self._data
        return self._prepare(adata)

    def prepared_cells(self, adata: ad.AnnData | None = None, indices=None) -> tuple:
        """``(data, idx)``: :meth:`prepared_data` of ``adata`` and the cells ``indices`` as an int64 tensor
        (positions or a boolean mask; None: every cell).

        Raises:
            CellvaeInputError: as :meth:`prepared_data`, and ``indices`` out of range or of the wrong length.
        """
        data = self.prepared_data(adata)
        return data, as_indices(indices, data.n_cells)

    def split_positions(self, adata: ad.AnnData) -> tuple[np.ndarray | None, np.ndarray | None]:
        """Positions in ``adata`` of the training and validation cells of the model's training (matched by obs
        name), or (None, None) when ``adata`` does not hold all of them."""
        return split_positions(self._split_names(), adata)

    def _split_names(self) -> dict | None:
        """Obs names of the training and validation cells (None when unknown or the names are not unique)."""
        if self.train_indices is None or self.validation_indices is None or self.adata is None:
            return self._saved_split
        names = self.adata.obs_names
        if not names.is_unique:
            return None
        return {"train": names[self.train_indices].astype(str).tolist(),
                "validation": names[self.validation_indices].astype(str).tolist()}

    def _extra_files(self) -> dict[str, bytes]:
        split = self._split_names()
        return {SPLIT: json.dumps(split).encode()} if split is not None else {}

    def _attach(self, directory: Path, cfg: dict, adata: ad.AnnData | None) -> None:
        """After loading: attach ``adata`` (genes checked) and place the saved split in it."""
        self.adata, self._data = None, None
        self.train_indices = self.validation_indices = None
        self._saved_split = _read_json(directory / SPLIT, cfg)
        if adata is not None:
            self.spec.gene_indexer(adata)  # fail early on missing genes
            self.adata = adata
            self.train_indices, self.validation_indices = split_positions(self._saved_split, adata)
