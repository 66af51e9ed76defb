#!/usr/bin/env python
"""Make the scvi-tools fixture of tests/test_from_scvi.py (run once, in the environment with scvi-tools 1.5.1):

    .venv-bench/bin/python tests/data/make_scvi_fixture.py

A tiny ``scvi.model.SCVI`` (n_hidden 16, n_latent 4, one layer, ZINB, gene dispersion, observed library, batch key
``donor``) is trained for 5 epochs on 200 cells x 100 genes of Kang et al. 2018 (``kang2018_ifnb_pbmc_muscat.h5ad``,
seeded subset) and saved with ``SCVI.save`` to ``tests/data/scvi_fixture/model/`` (without the AnnData). Beside it:

- ``data.h5ad``: the 200 cells x 100 genes (counts in X, obs ``donor``, ``cell_type``);
- ``expected.npz``: from scvi-tools, in eval mode: ``qz_m``, ``qz_v`` (200, 4), the latent representation
  (``get_latent_representation``), ``eps`` (200, 4) standard-normal draws and ``elbo`` (200,): the ELBO per cell
  (``-(reconstruction_loss + kl_local)`` of scvi-tools' ``module.loss``) at ``z = qz_m + sqrt(qz_v) * eps``, and
  ``log_px_at_mean`` (200,): ``log p(x | z = E_q[z])`` summed over genes (at the mean of q(l | x) for a latent
  library), and ``library`` (200, 1): the log library size the ELBO used (sampled from q(l | x) when latent);
- ``expected.json``: versions, settings and the mean ELBO of scvi-tools' own ``get_elbo`` (its own random draws).

The test reproduces the latent and the per-cell ELBO with cellvae alone (``CountVAE.from_scvi``).
A second model, ``model_latent_library/`` (latent library size, ``use_observed_lib_size=False``), checks the
library encoder and its prior (expectations with the suffix ``_ll``); a third, ``model_covariates/`` (NB,
``dispersion="gene-batch"``, two layers, ``encode_covariates=True``, categorical covariate ``condition`` and
continuous covariate ``log_total``), the placement of covariate columns (suffix ``_cov``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent / "scvi_fixture"
DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "kang2018_ifnb_pbmc_muscat.h5ad"


def main():
    import anndata as ad
    import scvi
    import torch

    torch.set_num_threads(1)
    scvi.settings.seed = 0
    a = ad.read_h5ad(DATA)
    rng = np.random.default_rng(0)
    cells = np.sort(rng.choice(a.n_obs, 200, replace=False))
    sub = a[cells]
    detected = np.asarray((sub.X > 0).sum(0)).ravel()
    genes = np.sort(np.argsort(-detected, kind="stable")[:100])
    sub = ad.AnnData(X=sub.X[:, genes].toarray().astype(np.float32),
                     obs=sub.obs[["donor", "cell_type", "condition"]].copy(), var=sub.var.iloc[genes][[]].copy())
    for k in ("donor", "condition"):
        sub.obs[k] = sub.obs[k].astype(str).astype("category")
    sub.obs["log_total"] = np.log(np.asarray(a[cells].X.sum(1)).ravel()).astype(np.float32)
    HERE.mkdir(parents=True, exist_ok=True)
    sub.write_h5ad(HERE / "data.h5ad", compression="gzip")

    out, meta = {}, {"scvi_tools": scvi.__version__, "torch": torch.__version__, "python": sys.version.split()[0],
                     "models": {}}
    models = [("model", "", {}, {}), ("model_latent_library", "_ll", {"use_observed_lib_size": False}, {}),
              ("model_covariates", "_cov",
               {"gene_likelihood": "nb", "dispersion": "gene-batch", "n_layers": 2, "encode_covariates": True},
               {"categorical_covariate_keys": ["condition"], "continuous_covariate_keys": ["log_total"]})]
    for name, suffix, kw, setup in models:
        adata = sub.copy()
        scvi.model.SCVI.setup_anndata(adata, batch_key="donor", **setup)
        m = scvi.model.SCVI(adata, n_hidden=16, n_latent=4, **kw)
        m.train(max_epochs=5, batch_size=64, train_size=0.9, accelerator="cpu", enable_progress_bar=False)
        m.save(str(HERE / name), overwrite=True, save_anndata=False)
        mod = m.module.eval()
        x = torch.as_tensor(adata.X)
        batch = torch.as_tensor(adata.obs["donor"].cat.codes.to_numpy(), dtype=torch.long)[:, None]
        cov = {}
        if setup:
            cov = {"cat_covs": torch.as_tensor(adata.obs["condition"].cat.codes.to_numpy(), dtype=torch.long)[:, None],
                   "cont_covs": torch.as_tensor(adata.obs[["log_total"]].to_numpy(), dtype=torch.float32)}
        g = torch.Generator().manual_seed(1)
        eps = torch.randn(adata.n_obs, 4, generator=g)
        with torch.no_grad():
            inf = mod.inference(x, batch, **cov)
            qz = inf["qz"]
            qz_m, qz_v = qz.loc, qz.scale**2
            z = qz_m + qz.scale * eps
            inf_z = dict(inf, z=z)
            gen = mod.generative(z, inf["library"], batch, **cov)
            tensors = {"X": x, "batch": batch, "labels": torch.zeros_like(batch)}
            loss = mod.loss(tensors, inf_z, gen)
            elbo = -(loss.reconstruction_loss["reconstruction_loss"] + loss.kl_local["kl_divergence_z"]
                     + loss.kl_local.get("kl_divergence_l", torch.zeros(x.shape[0])))
            gen_mean = mod.generative(qz_m, inf["library"] if inf.get("ql") is None else inf["ql"].loc, batch, **cov)
            log_px = gen_mean["px"].log_prob(x).sum(-1)
        latent = m.get_latent_representation()
        out.update({f"qz_m{suffix}": qz_m.numpy(), f"qz_v{suffix}": qz_v.numpy(), f"latent{suffix}": latent,
                    f"eps{suffix}": eps.numpy(), f"library{suffix}": inf["library"].numpy(), f"elbo{suffix}": elbo.numpy(),
                    f"log_px_at_mean{suffix}": log_px.numpy()})
        meta["models"][name] = {"settings": {"n_hidden": 16, "n_latent": 4, "batch_key": "donor", **kw, **setup},
                                "max_epochs": 5, "scvi_get_elbo_mean": float(m.get_elbo()),
                                "elbo_crn_mean": float(elbo.mean())}
    np.savez_compressed(HERE / "expected.npz", **out)
    (HERE / "expected.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(json.dumps(meta, indent=2))


if __name__ == "__main__":
    main()
