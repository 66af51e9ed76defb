#!/usr/bin/env python
"""Issue 24 diagnostic (no default changed): on every split of ``benchmarks/label_transfer.py``, cellvae's classifier
against a 15-nearest-neighbour vote of the reference labels on the same mapped latent, and their 50/50 blend.

Per split and seed: the benchmark's cellvae reference (CountVAE with the ARCHES settings, then
``LabelTransferVAE.from_count_vae``), ``map_query`` (100 epochs), then balanced accuracy and ECE (the benchmark's
``_scores``) of (a) ``predict(soft=True)`` (the calibrated classifier), (b) the kNN vote fractions
(scikit-learn ``KNeighborsClassifier(15)`` on the reference cells' mapped latent means), (c) their mean.
One JSON line per (split, seed).

    .venv-bench/bin/python benchmarks/label_transfer_blend.py [SEED ...]
"""
import json, sys, warnings
from pathlib import Path

import numpy as np

warnings.filterwarnings("ignore")
sys.path.insert(0, str(Path(__file__).resolve().parent))
import label_transfer as L  # noqa: E402
from _common import default_data_dir  # noqa: E402

import cellvae  # noqa: E402
import torch  # noqa: E402
from sklearn.neighbors import KNeighborsClassifier  # noqa: E402

torch.set_num_threads(1)
DATA = default_data_dir()
for seed in [int(s) for s in sys.argv[1:]] or [0]:
    for sp in L.splits(DATA):
        ref, query, truth, lk, bk, unscored = L.prepare(DATA, sp)
        m = cellvae.CountVAE(ref, batch_key=bk, **L.ARCHES).train(seed=seed, progress_bar=False, n_threads=1)
        lt = cellvae.LabelTransferVAE.from_count_vae(m, labels_key=lk, unlabeled_category=L.UNKNOWN)
        lt.train(seed=seed, progress_bar=False, n_threads=1)
        mapped = lt.map_query(query, batch_key=bk, seed=seed, progress_bar=False, n_threads=1)
        labels = list(lt.labels)
        p_clf = mapped.predict(soft=True)[labels].to_numpy()
        ref_lab = ref.obs[lk].astype(str).to_numpy()
        keep = np.isin(ref_lab, labels)
        knn = KNeighborsClassifier(15).fit(mapped.get_latent_representation(ref)[keep], ref_lab[keep])
        p_knn = np.zeros_like(p_clf)
        p_knn[:, [labels.index(c) for c in knn.classes_]] = knn.predict_proba(mapped.get_latent_representation())
        unk = mapped.predict_table()["unknown_score"].to_numpy()
        row = {"split": sp["split"], "seed": seed}
        for name, p in (("classifier", p_clf), ("knn", p_knn), ("blend", 0.5 * (p_clf + p_knn))):
            s = L._scores(truth, p, labels, unk, sp["left_out"], unscored, None, None)
            row[name] = {k: round(s[k], 4) for k in ("balanced_accuracy", "ece")}
        print(json.dumps(row), flush=True)
