#!/usr/bin/env python
"""Diagnosis of one label-transfer split (issue 24): is a misclassified query the latent's fault or the classifier's?

Trains the cellvae reference of ``benchmarks/label_transfer.py`` (CountVAE with its ARCHES settings, then
LabelTransferVAE.from_count_vae, seed LT_SEED (default 0), one thread) on the split whose name ends with SPLIT, maps the query with each
given number of query epochs and prints the benchmark's scores and the confusion table of the model's classifier;
then a 15-nearest-neighbour vote on the same mapped latent, and on the mapped latent of the CountVAE alone.

    .venv-bench/bin/python benchmarks/label_transfer_diagnose.py sc_dropseq 100 400
"""
import sys, time, numpy as np, pandas as pd, warnings
warnings.filterwarnings("ignore")
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
import label_transfer as L
from _common import default_data_dir

DATA = default_data_dir()
SEED = int(__import__("os").environ.get("LT_SEED", "0"))  # the training seed (LT_SEED=2 ...)
import cellvae, torch
torch.set_num_threads(1)
sp = [s for s in L.splits(DATA) if s["split"].endswith(sys.argv[1])][0]
print(sp)
ref, query, truth, lk, bk, unscored = L.prepare(DATA, sp)
print(ref.obs[bk].value_counts().to_dict(), ref.obs[lk].value_counts().to_dict(), pd.Series(truth).value_counts().to_dict())
m = cellvae.CountVAE(ref, batch_key=bk, **L.ARCHES).train(seed=SEED, progress_bar=False, n_threads=1)
lt = cellvae.LabelTransferVAE.from_count_vae(m, labels_key=lk, unlabeled_category=L.UNKNOWN)
lt.train(seed=SEED, progress_bar=False, n_threads=1)
for ep in [int(e) for e in sys.argv[2:]]:
    mapped = lt.map_query(query, batch_key=bk, seed=SEED, progress_bar=False, n_threads=1, max_epochs=ep)
    probs = mapped.predict(soft=True).to_numpy()
    row = L._scores(truth, probs, lt.labels, mapped.predict_table()["unknown_score"].to_numpy(), sp["left_out"], unscored, None, None)
    pred = np.asarray(lt.labels, dtype=object)[probs.argmax(1)]
    print(ep, {k: round(v, 3) for k, v in row.items()})
    print(pd.crosstab(truth, pred))
from sklearn.neighbors import KNeighborsClassifier
mapped = lt.map_query(query, batch_key=bk, seed=SEED, progress_bar=False, n_threads=1)
zr = mapped.get_latent_representation(ref); zq = mapped.get_latent_representation()
knn = KNeighborsClassifier(15).fit(zr, ref.obs[lk].to_numpy())
pq = knn.predict(zq)
known = np.isin(truth, lt.labels)
print("kNN on mapped latent acc", (pq[known] == truth[known]).mean())
print(pd.crosstab(truth, pq))
# reference model (CountVAE) latent mapping
mq = m.map_query(query, batch_key=bk, seed=SEED, progress_bar=False, n_threads=1)
zr = mq.get_latent_representation(ref); zq = mq.get_latent_representation()
pq = KNeighborsClassifier(15).fit(zr, ref.obs[lk].to_numpy()).predict(zq)
print("kNN on CountVAE-mapped latent acc", (pq[known] == truth[known]).mean())
print("query lib median", np.median(np.asarray(query.X.sum(1)).ravel()), "ref lib median", np.median(np.asarray(ref.X.sum(1)).ravel()))
