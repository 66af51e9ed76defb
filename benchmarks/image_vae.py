"""ImageVAE on the Jurkat cell-cycle images (BBBC048, 40x40 px, brightfield / DNA stain / darkfield): what the
latent space knows about the cell-cycle phase, whether a G1-only model flags mitotic cells, and latent arithmetic.

Data: ``images/jurkat_cellcycle_40px.npz`` in ``$CELLVAE_DATA_DIR`` (default ``../shared/data``), with its
stratified ``split`` (6,332 train / 1,583 test images). Every model: :class:`cellvae.ImageVAE` defaults
(channels 32-64-128, Gaussian likelihood with a learned per-channel standard deviation, beta = 1), ``--n-latent``,
``--epochs`` epochs (KL warm-up over the first half), batch size 128, train_size 0.9 (stratified by phase), seed
``--seed``, one torch thread.

(a) Linear probe. Logistic regression (scikit-learn, ``class_weight='balanced'``, on standardised features) fitted
    on the train-split images, balanced accuracy on the test split; features: the ImageVAE latent means (model
    trained on all train-split images) vs the first N principal components of the pixels (N = n_latent; PCA fitted
    on the train split). 7 phases, and 5 classes with the four mitotic phases merged into "M" (the README of the
    data suggests this: Anaphase has 3 test images and Telophase 5).
(b) Anomaly detection. An ImageVAE trained on the train-split G1 images only; score = negative ELBO (nats per
    image, 8 z draws, :meth:`cellvae.ImageVAE.get_anomaly_score`); AUROC of held-out (test-split) G1 images against
    the test-split mitotic images (Prophase, Metaphase, Anaphase, Telophase), overall and per phase. Because the G1
    model never sees any mitotic image, the AUROC against all mitotic images (both splits) is reported too, with S
    and G2 for context. Baseline: PCA (N components, fitted on train-split G1 pixels) reconstruction error.
(c) Latent arithmetic. With the main model, ``z_mid = (z_Prophase + z_Anaphase) / 2`` from the mean latent codes
    of the train-split images of each phase: the phase whose mean code is nearest to z_mid (Euclidean, latent
    space), and the phase whose mean image (pixel mean of its train-split images) and whose decoded mean code are
    nearest to the decoded z_mid (Euclidean over all pixels and channels, [0, 1] scale).

    .venv/bin/python benchmarks/image_vae.py [--epochs 30] [--n-latent 16] [--seed 0] [--figure arith.png]

Results: ``benchmarks/results/image_vae.{md,json}``.
"""

from __future__ import annotations

import os

for _v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cap_loaded_threads, default_data_dir, machine_description, write_json_and_md  # noqa: E402

import cellvae  # noqa: E402
from cellvae import ImageVAE  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
DATA_FILE = "images/jurkat_cellcycle_40px.npz"
MITOTIC = ("Prophase", "Metaphase", "Anaphase", "Telophase")
ARITH = ("Prophase", "Anaphase")


def _probe(f_train, y_train, f_test, y_test, seed):
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score, recall_score
    from sklearn.preprocessing import StandardScaler

    sc = StandardScaler().fit(f_train)
    clf = LogisticRegression(class_weight="balanced", max_iter=5000, random_state=seed)
    clf.fit(sc.transform(f_train), y_train)
    pred = clf.predict(sc.transform(f_test))
    classes = list(dict.fromkeys(y_test.tolist()))
    rec = recall_score(y_test, pred, labels=classes, average=None, zero_division=0)
    return {"balanced_accuracy": float(balanced_accuracy_score(y_test, pred)),
            "recall": {c: float(r) for c, r in zip(classes, rec)}}


def _auroc(neg_scores, pos_scores):
    from sklearn.metrics import roc_auc_score

    y = np.r_[np.zeros(len(neg_scores)), np.ones(len(pos_scores))]
    return float(roc_auc_score(y, np.r_[neg_scores, pos_scores]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=str(Path(default_data_dir()) / DATA_FILE))
    ap.add_argument("--n-latent", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--anomaly-samples", type=int, default=8)
    ap.add_argument("--out", default=str(RESULTS / "image_vae.md"))
    ap.add_argument("--figure", default=None, help="Optional PNG of the arithmetic check (for inspection).")
    args = ap.parse_args()
    torch.set_num_threads(1)
    cap_loaded_threads(1)
    t_all = time.perf_counter()

    with np.load(args.data) as d:
        images = d["images"]
        names = d["label_names"].astype(str)
        phase = names[d["labels"]]
        split = d["split"].astype(str)
        experiment = d["experiment"].astype(int) if "experiment" in d.files else np.ones(len(phase), dtype=int)
    train, test = split == "train", split == "test"
    x = images.astype(np.float32) / 255.0
    flat = x.reshape(len(x), -1)
    order = list(names)
    print(f"{len(x)} images, {train.sum()} train / {test.sum()} test", flush=True)
    train_kw = dict(max_epochs=args.epochs, batch_size=128, seed=args.seed, progress_bar=False, n_threads=1)

    # ---------------------------------------------------------------- (a) main model and linear probe
    t0 = time.perf_counter()
    torch.manual_seed(args.seed)
    vae = ImageVAE(3, 40, n_latent=args.n_latent)
    hist = vae.train(images[train], labels=phase[train], **train_kw)
    t_main = time.perf_counter() - t0
    print(f"main model: {len(hist['epoch'])} epochs in {t_main:.0f} s", flush=True)
    z = vae.get_latent_representation(images)
    elbo_test = vae.get_elbo(images[test], n_samples=1, seed=args.seed, return_parts=True)
    rec_test = vae.reconstruct(images[test])
    mse_test = ((rec_test - x[test]) ** 2).mean(axis=(0, 1, 2))

    from sklearn.decomposition import PCA

    t0 = time.perf_counter()
    pca = PCA(args.n_latent, random_state=args.seed).fit(flat[train])
    p = pca.transform(flat)
    t_pca = time.perf_counter() - t0
    merged = np.where(np.isin(phase, MITOTIC), "M", phase)
    probe = {}
    for feat_name, feat in (("ImageVAE latent means", z), (f"pixel PCA ({args.n_latent} PCs)", p)):
        probe[feat_name] = {
            "7 phases": _probe(feat[train], phase[train], feat[test], phase[test], args.seed),
            "5 classes (M merged)": _probe(feat[train], merged[train], feat[test], merged[test], args.seed),
        }
    pca_recon_mse = float(((pca.inverse_transform(p[test]) - flat[test]) ** 2).mean())

    # ---------------------------------------------------------------- (b) G1-only model, anomaly AUROC
    g1_train = train & (phase == "G1")
    t0 = time.perf_counter()
    torch.manual_seed(args.seed)
    vae_g1 = ImageVAE(3, 40, n_latent=args.n_latent)
    hist_g1 = vae_g1.train(images[g1_train], **train_kw)
    t_g1 = time.perf_counter() - t0
    print(f"G1 model: {len(hist_g1['epoch'])} epochs in {t_g1:.0f} s", flush=True)
    scored = ~g1_train  # every image the G1 model did not see
    t0 = time.perf_counter()
    score = np.full(len(x), np.nan)
    score[scored] = vae_g1.get_anomaly_score(images[scored], n_samples=args.anomaly_samples, seed=args.seed)
    t_score = time.perf_counter() - t0
    pca_g1 = PCA(args.n_latent, random_state=args.seed).fit(flat[g1_train])
    base = np.full(len(x), np.nan)
    base[scored] = ((pca_g1.inverse_transform(pca_g1.transform(flat[scored])) - flat[scored]) ** 2).sum(1)
    g1_test = test & (phase == "G1")
    n_neg = {"G1 test": int(g1_test.sum()), "G1 test, experiment 1": int((g1_test & (experiment == 1)).sum())}
    anomaly = {}
    for method, s in (("ImageVAE -ELBO", score), ("PCA reconstruction error", base)):
        rows = {}
        mit_test = test & np.isin(phase, MITOTIC)
        mit_all = np.isin(phase, MITOTIC)
        rows["all mitotic"] = {"test": _auroc(s[g1_test], s[mit_test]), "all": _auroc(s[g1_test], s[mit_all]),
                               "n_test": int(mit_test.sum()), "n_all": int(mit_all.sum())}
        for ph in MITOTIC + ("S", "G2"):
            t_sel, a_sel = test & (phase == ph), phase == ph
            rows[ph] = {"test": _auroc(s[g1_test], s[t_sel]) if t_sel.any() else None,
                        "all": _auroc(s[g1_test], s[a_sel]), "n_test": int(t_sel.sum()), "n_all": int(a_sel.sum())}
        # Confound check: all S, G2 and mitotic images come from experiment 1, but 83 % of the G1 images from
        # experiment 2. Negatives from experiment 1 only, and experiment-1 G1 against experiment-2 G1.
        g1_e1, g1_e2 = g1_test & (experiment == 1), g1_test & (experiment == 2)
        rows["all mitotic, negatives: experiment-1 G1"] = {
            "test": _auroc(s[g1_e1], s[mit_test]), "all": _auroc(s[g1_e1], s[mit_all]),
            "n_test": int(mit_test.sum()), "n_all": int(mit_all.sum())}
        if g1_e1.any() and g1_e2.any():
            rows["experiment-1 G1 vs experiment-2 G1 (batch effect)"] = {
                "test": _auroc(s[g1_e2], s[g1_e1]), "all": None, "n_test": int(g1_e1.sum()), "n_all": None}
        anomaly[method] = rows
    mean_score = {ph: float(np.nanmean(score[test & (phase == ph)])) for ph in order}

    # ---------------------------------------------------------------- (c) latent arithmetic
    zc = {ph: z[train & (phase == ph)].mean(0) for ph in order}
    res = vae.latent_arithmetic([zc[ARITH[0]], zc[ARITH[1]]], [0.5, 0.5])
    z_mid, x_mid = res["z"], res["image"]
    dec_means = vae.decode(np.stack([zc[ph] for ph in order]))
    pix_means = {ph: x[train & (phase == ph)].mean(0) for ph in order}
    d_lat = {ph: float(np.linalg.norm(z_mid - zc[ph])) for ph in order}
    d_pix = {ph: float(np.linalg.norm(x_mid - pix_means[ph])) for ph in order}
    d_dec = {ph: float(np.linalg.norm(x_mid - dec_means[k])) for k, ph in enumerate(order)}
    arithmetic = {
        "expression": f"(z_{ARITH[0]} + z_{ARITH[1]}) / 2",
        "latent_distance": d_lat, "pixel_distance_to_mean_image": d_pix, "pixel_distance_to_decoded_mean": d_dec,
        "nearest_latent": min(d_lat, key=d_lat.get), "nearest_mean_image": min(d_pix, key=d_pix.get),
        "nearest_decoded_mean": min(d_dec, key=d_dec.get),
        "nearest_excluding_operands": {
            k: min((ph for ph in order if ph not in ARITH), key=dd.get)
            for k, dd in (("latent", d_lat), ("mean_image", d_pix), ("decoded_mean", d_dec))},
    }
    if args.figure:
        _figure(args.figure, vae, zc, x_mid, pix_means, order)

    total = time.perf_counter() - t_all
    best = hist["best_epoch"]
    payload = {
        "data": DATA_FILE, "n_images": int(len(x)), "n_train": int(train.sum()), "n_test": int(test.sum()),
        "n_test_by_phase": {ph: int((test & (phase == ph)).sum()) for ph in order},
        "settings": {"n_latent": args.n_latent, "epochs": args.epochs, "seed": args.seed, "batch_size": 128,
                     "model": repr(vae), "anomaly_samples": args.anomaly_samples, "threads": 1},
        "machine": machine_description(), "cellvae_version": cellvae.__version__, "torch_version": torch.__version__,
        "main_model": {"epochs_run": len(hist["epoch"]), "best_epoch": best,
                       "validation_elbo": hist["validation_elbo"][best - 1],
                       "test_elbo": float(elbo_test["elbo"].mean()),
                       "test_reconstruction_loss": float(elbo_test["reconstruction_loss"].mean()),
                       "test_kl": float(elbo_test["kl_local"].mean()),
                       "test_mse_per_channel": [float(v) for v in mse_test],
                       "test_mse": float(mse_test.mean()), "pca_test_mse": pca_recon_mse,
                       "likelihood_sd": vae.module.scale().detach().flatten().tolist(),
                       "train_seconds": round(t_main, 1),
                       "images_per_second": round(float(hist["train_cells_per_second"]), 1)},
        "g1_model": {"negatives": n_neg, "epochs_run": len(hist_g1["epoch"]), "best_epoch": hist_g1["best_epoch"],
                     "n_train_images": int(g1_train.sum()), "train_seconds": round(t_g1, 1),
                     "scoring_seconds": round(t_score, 1), "mean_score_test_by_phase": mean_score},
        "pca_seconds": round(t_pca, 1),
        "probe": probe, "anomaly_auroc": anomaly, "arithmetic": arithmetic, "total_seconds": round(total, 1),
    }
    write_json_and_md(Path(args.out), payload, _markdown(payload, order))


def _figure(path, vae, zc, x_mid, pix_means, order):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = [(f"decoded {ARITH[0]}", vae.decode(zc[ARITH[0]][None])[0]), ("decoded midpoint", x_mid),
            (f"decoded {ARITH[1]}", vae.decode(zc[ARITH[1]][None])[0])]
    cols += [(f"decoded {ph}", vae.decode(zc[ph][None])[0]) for ph in order if ph not in ARITH]
    cols += [(f"mean image {ph}", pix_means[ph]) for ph in order]
    fig, axes = plt.subplots(3, len(cols), figsize=(1.1 * len(cols), 3.6))
    for j, (name, img) in enumerate(cols):
        for ch in range(3):
            axes[ch, j].imshow(img[..., ch], cmap="gray", vmin=0, vmax=1)
            axes[ch, j].set_xticks([])
            axes[ch, j].set_yticks([])
        axes[0, j].set_title(name, fontsize=5)
    fig.savefig(path, dpi=130, bbox_inches="tight")
    plt.close(fig)


def _markdown(r: dict, order) -> str:
    s, m, g = r["settings"], r["main_model"], r["g1_model"]
    lines = [
        "# ImageVAE on Jurkat cell-cycle images (BBBC048, 40x40 px, 3 channels)",
        "",
        f"Data: `{r['data']}` ({r['n_images']} images; file split {r['n_train']} train / {r['n_test']} test). "
        f"Model: `{s['model']}`; {s['epochs']} epochs (KL warm-up over the first half), batch 128, train_size 0.9 "
        f"(stratified by phase), seed {s['seed']}, {s['threads']} torch thread. Machine: {r['machine']}; cellvae "
        f"{r['cellvae_version']}, torch {r['torch_version']}. Produced by `benchmarks/image_vae.py`.",
        "",
        f"Main model (all train-split images): {m['epochs_run']} epochs in {m['train_seconds']:.0f} s "
        f"({m['images_per_second']:.0f} images/s), best epoch {m['best_epoch']}; validation ELBO "
        f"{m['validation_elbo']:.1f}, test ELBO {m['test_elbo']:.1f} nats per image (reconstruction "
        f"{m['test_reconstruction_loss']:.1f}, KL {m['test_kl']:.1f}); test MSE per pixel {m['test_mse']:.5f} "
        f"(brightfield / DNA / darkfield {', '.join(f'{v:.5f}' for v in m['test_mse_per_channel'])}; pixel PCA with "
        f"{s['n_latent']} PCs: {m['pca_test_mse']:.5f}); learned likelihood sd per channel "
        f"{', '.join(f'{v:.3f}' for v in m['likelihood_sd'])}.",
        f"G1-only model: {g['n_train_images']} train-split G1 images, {g['epochs_run']} epochs in "
        f"{g['train_seconds']:.0f} s, best epoch {g['best_epoch']}; scoring (8 z draws) {g['scoring_seconds']:.0f} s. "
        f"Total wall time {r['total_seconds']:.0f} s.",
        "",
        "## (a) Linear probe: balanced accuracy on the test split",
        "",
        "Logistic regression (class_weight='balanced', standardised features) fitted on the train split.",
        "",
        "| features | 7 phases | 5 classes (M merged) |",
        "| --- | --- | --- |",
    ]
    for feat, v in r["probe"].items():
        lines.append(f"| {feat} | {v['7 phases']['balanced_accuracy']:.3f} | "
                     f"{v['5 classes (M merged)']['balanced_accuracy']:.3f} |")
    lines += ["", "Recall per phase (7-phase probe; test images per phase: "
              + ", ".join(f"{ph} {n}" for ph, n in r["n_test_by_phase"].items()) + "):", "",
              "| features | " + " | ".join(order) + " |", "| --- |" + " --- |" * len(order)]
    for feat, v in r["probe"].items():
        rec = v["7 phases"]["recall"]
        lines.append(f"| {feat} | " + " | ".join(f"{rec.get(ph, float('nan')):.2f}" for ph in order) + " |")
    lines += [
        "",
        "## (b) Anomaly detection: G1-only model, AUROC of held-out G1 vs other phases",
        "",
        f"Negatives: the {g['negatives']['G1 test']} test-split G1 images (not seen in training). Positives: the "
        "test-split images of each phase (`test`), or all images of the phase (`all`; the G1 model saw none of them). "
        "Score: negative ELBO (nats per image; higher = more anomalous). Confound check: every S, G2 and mitotic "
        "image comes from experiment 1, but most G1 images (and so most of the G1 model's training images) from "
        "experiment 2; the row with experiment-1 negatives uses only the "
        f"{g['negatives']['G1 test, experiment 1']} experiment-1 G1 test images, and the last row scores "
        "experiment-1 against experiment-2 G1 test images (0.5 = no batch effect seen by the score).",
        "",
        "| positives | n test / all | ImageVAE -ELBO test | ImageVAE -ELBO all | PCA recon. error test | "
        "PCA recon. error all |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    a, b = r["anomaly_auroc"]["ImageVAE -ELBO"], r["anomaly_auroc"]["PCA reconstruction error"]
    for k in a:
        f = (lambda v: "-" if v is None else f"{v:.3f}")
        lines.append(f"| {k} | {a[k]['n_test']} / {a[k]['n_all'] if a[k]['n_all'] is not None else '-'} | {f(a[k]['test'])} | {f(a[k]['all'])} | "
                     f"{f(b[k]['test'])} | {f(b[k]['all'])} |")
    lines += ["", "Mean anomaly score (nats per image) of the test images by phase: "
              + ", ".join(f"{ph} {v:.0f}" for ph, v in g["mean_score_test_by_phase"].items()) + ".", ""]
    ar = r["arithmetic"]
    lines += [
        "## (c) Latent arithmetic: " + ar["expression"],
        "",
        "Mean latent codes of the train-split images of each phase; the decoded midpoint compared with each phase.",
        "",
        "| phase | latent distance | pixel distance to the phase's mean image | pixel distance to the decoded phase "
        "mean |",
        "| --- | --- | --- | --- |",
    ]
    for ph in order:
        lines.append(f"| {ph} | {ar['latent_distance'][ph]:.3f} | {ar['pixel_distance_to_mean_image'][ph]:.3f} | "
                     f"{ar['pixel_distance_to_decoded_mean'][ph]:.3f} |")
    ex = ar["nearest_excluding_operands"]
    lines += [
        "",
        f"Nearest phase other than the two operands ({', '.join(ARITH)}): latent space **{ex['latent']}**, "
        f"mean image **{ex['mean_image']}**, decoded mean **{ex['decoded_mean']}**. Including the operands: "
        f"latent **{ar['nearest_latent']}** (the midpoint is equidistant from both operands by construction), "
        f"mean image **{ar['nearest_mean_image']}**, decoded mean **{ar['nearest_decoded_mean']}**.",
        "",
    ]
    return "\n".join(lines)



if __name__ == "__main__":
    main()
