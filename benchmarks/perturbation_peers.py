"""Run one peer perturbation model (scGen or CPA) on one held-out split; called by ``perturbation.py``.

Each peer has its own virtual environment, because their pins conflict with each other and with the scvi-tools
1.5.1 of ``.venv-bench`` (scGen 2.1.0 needs scvi-tools < 0.20; cpa-tools 0.8.8 needs Python < 3.11, torch <= 2.0.1,
scvi-tools < 1.0):

- ``.venv-scgen``: Python 3.10, ``scgen==2.1.0`` with ``scvi-tools==0.17.4``, ``torch==1.13.1``;
- ``.venv-cpa``: Python 3.10, ``cpa-tools==0.8.8`` (its own pins).

This script imports neither cellvae nor anything outside numpy/scipy/anndata/scanpy and the peer, so it runs in
either environment. Input: an ``.npz`` written by ``perturbation.py`` with the raw counts of the training cells
(all control cells and the stimulated cells of the other types) and their obs (``condition``, ``cell_type``), the
name of the held-out type and the control / stimulated categories. Output: an ``.npz`` with the predicted
stimulated cells of the held-out type, one row per control cell of that type, in the order of the input, and a
JSON sidecar with the versions, settings, epochs and seconds.

- **scGen** (Lotfollahi, Wolf & Theis 2019, Nat. Methods 16:715; package ``scgen`` 2.1.0): trained on log1p(counts
  per 10,000), as in its Kang tutorial, with the tutorial's settings (``max_epochs=100, batch_size=32,
  early_stopping=True, early_stopping_patience=25``; model defaults: 800 hidden units, 100 latent dimensions);
  ``SCGEN.predict(ctrl_key, stim_key, celltype_to_predict=T)`` (latent arithmetic with scGen's own balancing).
  Output ``kind = "lognorm"``: predicted log1p(counts per 10,000), unclipped.
- **CPA** (Lotfollahi et al. 2023, Mol. Syst. Biol. 19:e11517; package ``cpa-tools`` 0.8.8): raw counts with the
  NB loss, ``categorical_covariate_keys=['cell_type']``, a dummy dose of 1.0, and the model and trainer
  parameters of CPA's Kang tutorial (``docs/tutorials/Kang.ipynb``: 64 latent dimensions, autoencoder pretraining
  30 epochs, adversary warm-up 50 epochs, ``batch_size=512``, ``early_stopping_patience=5``,
  ``check_val_every_n_epoch=5``) with ``max_epochs`` capped (``--cpa-max-epochs``, tutorial 2000). 15 % of the
  training cells (seeded) are CPA's validation split; the held-out type's stimulated cells are never seen. The
  control cells of the held-out type are relabelled ``stim`` and passed to ``CPA.predict`` (counterfactual: their
  basal state plus the stim embedding and their cell type's embedding; CPA's setup is run again on them, since it
  stores the perturbation encodings). Output ``kind = "counts"``: CPA's predicted NB means (``obsm['CPA_pred']``,
  ``X``) and counts drawn from the same NB (``X_sampled``), both normalized by the benchmark like counts.

    .venv-scgen/bin/python benchmarks/perturbation_peers.py scgen IN.npz OUT.npz --seed 0
    .venv-cpa/bin/python benchmarks/perturbation_peers.py cpa IN.npz OUT.npz --seed 0
"""

from __future__ import annotations

import os

for _v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from importlib import metadata  # noqa: E402

import numpy as np  # noqa: E402

SCGEN_TRAIN = {"max_epochs": 100, "batch_size": 32, "early_stopping": True, "early_stopping_patience": 25}

CPA_MODEL = {
    "n_latent": 64, "recon_loss": "nb", "doser_type": "linear", "n_hidden_encoder": 128, "n_layers_encoder": 2,
    "n_hidden_decoder": 512, "n_layers_decoder": 2, "use_batch_norm_encoder": True, "use_layer_norm_encoder": False,
    "use_batch_norm_decoder": False, "use_layer_norm_decoder": True, "dropout_rate_encoder": 0.0,
    "dropout_rate_decoder": 0.1, "variational": False,
}
CPA_TRAINER = {
    "n_epochs_kl_warmup": None, "n_epochs_pretrain_ae": 30, "n_epochs_adv_warmup": 50, "n_epochs_mixup_warmup": 0,
    "mixup_alpha": 0.0, "adv_steps": None, "n_hidden_adv": 64, "n_layers_adv": 3, "use_batch_norm_adv": True,
    "use_layer_norm_adv": False, "dropout_rate_adv": 0.3, "reg_adv": 20.0, "pen_adv": 5.0, "lr": 0.0003,
    "wd": 4e-07, "adv_lr": 0.0003, "adv_wd": 4e-07, "adv_loss": "cce", "doser_lr": 0.0003, "doser_wd": 4e-07,
    "do_clip_grad": True, "gradient_clip_value": 1.0, "step_size_lr": 10,
}
CPA_FIT = {"batch_size": 512, "early_stopping_patience": 5, "check_val_every_n_epoch": 5}


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "?"


def _load(path: str):
    """The split written by perturbation.py -> (train AnnData of counts, held-out type, ctrl, stim categories)."""
    import anndata as ad
    import pandas as pd

    z = np.load(path, allow_pickle=False)
    obs = pd.DataFrame({"condition": z["condition"].astype(str), "cell_type": z["cell_type"].astype(str)},
                       index=z["obs_names"].astype(str))
    var = pd.DataFrame(index=z["var_names"].astype(str))
    adata = ad.AnnData(X=z["counts"].astype(np.float32), obs=obs, var=var)
    for k in ("condition", "cell_type"):
        adata.obs[k] = adata.obs[k].astype("category")
    return adata, str(z["held_out"]), str(z["control"]), str(z["perturbed"])


def run_scgen(adata, held: str, ctrl: str, stim: str, seed: int, args) -> tuple[np.ndarray, dict]:
    import scanpy as sc
    import scgen
    import scvi
    import torch

    torch.set_num_threads(1)
    scvi.settings.seed = seed
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    scgen.SCGEN.setup_anndata(adata, batch_key="condition", labels_key="cell_type")
    model = scgen.SCGEN(adata)
    kw = dict(SCGEN_TRAIN)
    if args.scgen_max_epochs is not None:
        kw["max_epochs"] = args.scgen_max_epochs
    t0 = time.perf_counter()
    model.train(use_gpu=False, **kw)
    train_s = time.perf_counter() - t0
    pred, _ = model.predict(ctrl_key=ctrl, stim_key=stim, celltype_to_predict=held)
    # predict() keeps the control cells of the held-out type in their order in adata
    order = adata.obs_names[(adata.obs["cell_type"] == held).to_numpy() & (adata.obs["condition"] == ctrl).to_numpy()]
    pred_names = np.asarray(pred.obs_names).astype(str)
    X = np.asarray(pred.X.toarray() if hasattr(pred.X, "toarray") else pred.X, dtype=np.float32)
    if list(pred_names) != list(order):
        pos = {n: i for i, n in enumerate(pred_names)}
        X = X[[pos[n] for n in order]]
    hist = model.history.get("elbo_train") if hasattr(model, "history") and model.history else None
    info = {"tool": "scgen", "versions": {d: _version(d) for d in ("scgen", "scvi-tools", "torch", "anndata",
                                                                    "scanpy")},
            "settings": {"train": kw, "model": "scgen.SCGEN defaults (n_hidden=800, n_latent=100, n_layers=2)",
                         "input": "log1p(counts per 10,000)", "seed": seed},
            "epochs_run": int(len(hist)) if hist is not None else None, "train_s": round(train_s, 1),
            "kind": "lognorm", "cells": [str(c) for c in order]}
    return X, info


def run_cpa(adata, held: str, ctrl: str, stim: str, seed: int, args) -> tuple[np.ndarray, dict]:
    import cpa
    import torch

    torch.set_num_threads(1)
    rng = np.random.default_rng(seed)
    is_ctrl_t = (adata.obs["cell_type"] == held).to_numpy() & (adata.obs["condition"] == ctrl).to_numpy()
    query = adata[is_ctrl_t].copy()  # raw counts of the held-out type's control cells, before setup
    adata.obs["dose"] = "1.0"
    adata.obs["split"] = np.where(rng.random(adata.n_obs) < 0.15, "valid", "train")
    setup = dict(perturbation_key="condition", control_group=ctrl, dosage_key="dose",
                 categorical_covariate_keys=["cell_type"], is_count_data=True, max_comb_len=1)
    cpa.CPA.setup_anndata(adata, **setup)
    model = cpa.CPA(adata=adata, split_key="split", train_split="train", valid_split="valid", test_split="ood",
                    seed=seed, **CPA_MODEL)
    t0 = time.perf_counter()
    save = os.path.join(args.workdir, "cpa_model")
    model.train(max_epochs=args.cpa_max_epochs, use_gpu=False, plan_kwargs=CPA_TRAINER, save_path=save, **CPA_FIT)
    train_s = time.perf_counter() - t0
    # the counterfactual (CPA's predict docstring): the control cells' expression with the perturbation set to stim;
    # the perturbation encodings are made by setup_anndata, so the relabelled cells are set up again
    query.obs["condition"] = pd_categorical([stim] * query.n_obs, [ctrl, stim])
    query.obs["dose"] = "1.0"
    query.obs["split"] = "ood"
    cpa.CPA.setup_anndata(query, **setup)
    model.predict(query, batch_size=2048, n_samples=1)
    X = np.asarray(query.obsm["CPA_pred"], dtype=np.float32)
    # counts drawn from the NB of the same forward pass (for a like-for-like comparison with cellvae's sampled counts)
    torch.manual_seed(seed)
    module = model.module
    module.eval()
    adata_q = model._validate_anndata(query)
    dl = model._make_data_loader(adata=adata_q, indices=np.arange(adata_q.n_obs), batch_size=2048, shuffle=False)
    draws, means = [], []
    with torch.no_grad():
        for tensors in dl:
            tensors, _ = module.mixup_data(tensors, alpha=0.0)
            _, gen = module.forward(tensors, inference_kwargs={"n_samples": 1, "covars_to_add": None},
                                    get_generative_input_kwargs={"latent": "z"}, compute_loss=False)
            means.append(gen["px"].mu.cpu().numpy())
            draws.append(gen["px"].sample().cpu().numpy())
    mu = np.concatenate(means).astype(np.float32)
    if not np.allclose(mu, X, rtol=1e-4, atol=1e-4):
        raise RuntimeError(f"CPA: the NB means of the sampling pass differ from predict() (max "
                           f"{np.abs(mu - X).max():.3g})")
    sampled = np.concatenate(draws).astype(np.float32)
    hist = getattr(model, "epoch_history", None)
    epochs = None
    if isinstance(hist, dict) and hist.get("epoch"):
        epochs = int(max(hist["epoch"])) + 1
    info = {"tool": "cpa", "versions": {d: _version(d) for d in ("cpa-tools", "scvi-tools", "torch", "anndata",
                                                                  "scanpy", "lightning")},
            "settings": {"model": CPA_MODEL, "trainer": CPA_TRAINER, "fit": CPA_FIT,
                         "max_epochs": args.cpa_max_epochs, "validation_fraction": 0.15, "seed": seed,
                         "input": "raw counts, NB loss, cell_type covariate, dose 1.0"},
            "epochs_run": epochs, "train_s": round(train_s, 1), "kind": "counts",
            "cells": [str(c) for c in query.obs_names], "extra": {"X_sampled": sampled}}
    return X, info


def pd_categorical(values, categories):
    import pandas as pd

    return pd.Categorical(values, categories=categories)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("tool", choices=["scgen", "cpa"])
    p.add_argument("inp")
    p.add_argument("out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scgen-max-epochs", type=int, default=None)
    p.add_argument("--cpa-max-epochs", type=int, default=2000)
    p.add_argument("--workdir", default=None)
    args = p.parse_args()
    args.workdir = args.workdir or os.path.dirname(os.path.abspath(args.out))
    warnings.filterwarnings("ignore")
    adata, held, ctrl, stim = _load(args.inp)
    t0 = time.perf_counter()
    X, info = (run_scgen if args.tool == "scgen" else run_cpa)(adata, held, ctrl, stim, args.seed, args)
    info["total_s"] = round(time.perf_counter() - t0, 1)
    info["python"] = platform.python_version()
    info["executable"] = sys.executable
    tmp = args.out + ".tmp.npz"
    extra = info.pop("extra", {})
    np.savez_compressed(tmp, X=X, cells=np.asarray(info["cells"]), **extra)
    os.replace(tmp, args.out)
    info.pop("cells")
    with open(args.out + ".json.tmp", "w") as fh:
        json.dump(info, fh, indent=1)
    os.replace(args.out + ".json.tmp", args.out + ".json")
    print(json.dumps({k: v for k, v in info.items() if k != "settings"}))


if __name__ == "__main__":
    main()
