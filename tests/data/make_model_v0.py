"""Regenerate tests/data/model_v0/: a tiny CountVAE saved in model format version 0 (see docs/model_format.md).

Format 0 is the layout before format versions were written: ``config.json`` without ``format_version``,
``is_trained`` and ``model_class``; the modelled genes as a top-level ``gene_names`` list instead of
``data_spec.gene_names``; no ``data_spec.normal_transform``; no ``history.json`` or ``split.json``. ``model.pt``
is the same plain state dict as in format 1.

Run from the repository root: ``.venv/bin/python tests/data/make_model_v0.py``. It trains 8 genes x 120 cells of
Kang et al. 2018 (donor as batch; n_hidden 8, n_latent 2) for 2 epochs, writes the model and
``model_v0_expected.json`` (6 cells' counts, donors and latent means computed by the model before it was
converted), which tests/test_model_format.py compares against after loading through the migration.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import torch

HERE = Path(__file__).resolve().parent


def main() -> None:
    torch.set_num_threads(1)
    sys.path.insert(0, str(HERE.parent))
    from conftest import DATA_DIR, _subset

    from cellvae import CountVAE

    adata = _subset(ad.read_h5ad(DATA_DIR / "kang2018_ifnb_pbmc_muscat.h5ad"), 120, 8, seed=2)
    model = CountVAE(adata, batch_key="donor", n_hidden=8, n_latent=2)
    model.train(max_epochs=2, batch_size=32, progress_bar=False, seed=0, n_threads=1)
    target = HERE / "model_v0"
    if target.exists():
        shutil.rmtree(target)
    model.save(target)

    cfg = json.loads((target / "config.json").read_text())
    spec = cfg["data_spec"]
    v0 = {
        "cellvae_version": "0.0.1",
        "gene_names": spec.pop("gene_names"),
        "data_spec": {k: v for k, v in spec.items() if k != "normal_transform"},
        "labels_key": cfg["labels_key"],
        "module_kwargs": cfg["module_kwargs"],
    }
    (target / "config.json").write_text(json.dumps(v0, indent=2) + "\n")
    for name in ("history.json", "split.json"):
        if (target / name).exists():
            os.remove(target / name)

    cells = np.arange(6) * 17
    sub = adata[cells]
    expected = {
        "obs_names": sub.obs_names.tolist(),
        "var_names": sub.var_names.tolist(),
        "counts": sub.X.toarray().astype(int).tolist(),
        "donor": sub.obs["donor"].astype(str).tolist(),
        "latent_mean": model.get_latent_representation(sub.copy()).astype(float).tolist(),
    }
    (HERE / "model_v0_expected.json").write_text(json.dumps(expected, indent=1) + "\n")
    print(f"wrote {target} and {HERE / 'model_v0_expected.json'}")


if __name__ == "__main__":
    main()
