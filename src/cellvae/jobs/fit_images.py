"""The job behind ``cellvae fit-images DATA.npz --out DIR``: fit an :class:`cellvae.ImageVAE` to single-cell
images, then write the model, latent codes, figures, metrics and an HTML report.

Input: an ``.npz`` file holding ``images`` (n, H, W, C) uint8 (or float in [0, 1]), and optionally ``labels`` (n,)
(integers indexing ``label_names``, or strings), ``label_names`` and ``split`` (n,) strings ``"train"`` / ``"test"``.
With a split the model is trained on the ``train`` images and evaluated on the ``test`` images; without one, a
seeded 20 % of the images (stratified by label) is held out as the test set.

Outputs in ``out_dir``:

- ``model/``: the trained model (:meth:`cellvae.ImageVAE.load`);
- ``latent.npz``: ``latent_mean``, ``latent_var`` (n, n_latent) for every image in file order, ``elbo`` (n,) in
  nats per image (one z draw), ``split``, and ``labels`` / ``label_names`` when known;
- ``figures/``: ``training_curves.png``, ``reconstructions.png`` (test images beside their reconstructions, one
  grayscale row per channel), ``latent_grid.png`` (images decoded on a grid over the two leading principal
  directions of the latent means), ``interpolation.png`` (decoded straight path between the mean codes of two
  labels), ``latent_pca.png`` (latent means coloured by label), ``samples.png`` (decoded draws from the prior
  and from the training images' aggregate posterior);
- ``report.html`` (figures embedded as base64, metrics table), ``metrics.json``.

Every output file is written to a temporary name and renamed.
"""

from __future__ import annotations

import html
import json
import os
import time
from pathlib import Path

import numpy as np

from ..errors import CellvaeInputError
from ..data.fileio import write_atomic, write_text_atomic
from ..models.image_vae import ImageVAE
from ..data.images import to_float_images
from .outdir import OutputDir
from ..train.threads import torch_threads

__all__ = ["fit_images_job", "load_image_npz", "PREFERRED_INTERPOLATION"]

# Endpoints of the interpolation figure when both labels exist (interphase to mitosis); else first -> last label.
PREFERRED_INTERPOLATION = ("G1", "Metaphase")
IMAGE_OUTPUTS = ("model", "latent.npz", "figures", "metrics.json", "report.html")
N_RECON_PER_LABEL = 2
N_RECON_MAX = 16
GRID_STEPS = 9
GRID_LIMIT = 2.0  # latent grid spans +-GRID_LIMIT standard deviations along each principal direction
N_INTERP = 10
N_SAMPLES = 16


def load_image_npz(path: str | os.PathLike, images_key: str = "images", labels_key: str | None = None,
                   split_key: str = "split") -> dict:
    """Read an image ``.npz`` for :func:`fit_images_job`.

    Args:
        path: the ``.npz`` file.
        images_key: key of the (n, H, W, C) images.
        labels_key: key of the (n,) labels; None: ``"labels"`` when the file has it, else no labels. Integer labels
            are mapped through ``label_names`` (or ``<labels_key>_names``) when the file has it.
        split_key: key of the (n,) ``"train"`` / ``"test"`` split (ignored when absent).

    Returns:
        dict with ``images`` (n, H, W, C) as stored, ``labels`` (n,) str or None, ``label_order`` (label names in
        the file's order, or sorted), ``split`` (n,) str or None, ``channel_names`` (C,) str.

    Raises:
        CellvaeInputError: a missing or unreadable file, a missing key, or arrays of inconsistent lengths or values.
    """
    p = Path(path)
    if not p.is_file():
        raise CellvaeInputError(f"{str(p)!r} does not exist or is not a file; pass an .npz file of images.")
    try:
        npz = np.load(p, allow_pickle=False)
        keys = list(npz.files)
    except Exception as e:  # noqa: BLE001 - not a zip, damaged, pickled objects
        raise CellvaeInputError(f"{str(p)!r} cannot be read as an .npz file ({type(e).__name__}: {e}).") from e
    with npz:
        if images_key not in keys:
            raise CellvaeInputError(f"{str(p)!r} has no {images_key!r} array (keys: {keys}); pass --images-key.")
        images = npz[images_key]
        if images.ndim != 4:
            raise CellvaeInputError(f"{images_key!r} must have shape (n, H, W, C), got {images.shape}.")
        n = images.shape[0]
        explicit = labels_key is not None
        labels_key = labels_key or "labels"
        labels = order = None
        if labels_key in keys:
            raw = npz[labels_key]
            if raw.shape != (n,):
                raise CellvaeInputError(f"{labels_key!r} has shape {raw.shape}; expected ({n},), one label per image.")
            names_key = next((k for k in ("label_names", f"{labels_key}_names") if k in keys), None)
            if raw.dtype.kind in "iu" and names_key is not None:
                names = np.asarray(npz[names_key]).astype(str)
                if raw.size and (raw.min() < 0 or raw.max() >= len(names)):
                    raise CellvaeInputError(f"{labels_key!r} holds codes outside 0..{len(names) - 1} of "
                                            f"{names_key!r}.")
                labels = names[raw]
                order = [s for s in names.tolist() if s in set(labels.tolist())]
            else:
                labels = raw.astype(str)
                order = sorted(set(labels.tolist()))
        elif explicit:
            raise CellvaeInputError(f"{str(p)!r} has no {labels_key!r} array (keys: {keys}).")
        split = None
        if split_key in keys:
            split = np.asarray(npz[split_key]).astype(str)
            if split.shape != (n,):
                raise CellvaeInputError(f"{split_key!r} has shape {split.shape}; expected ({n},).")
            bad = sorted(set(split.tolist()) - {"train", "test"})
            if bad:
                raise CellvaeInputError(f"{split_key!r} may only hold 'train' and 'test', found {bad}.")
        c = images.shape[-1]
        if "channel_names" in keys and len(npz["channel_names"]) == c:
            channel_names = np.asarray(npz["channel_names"]).astype(str)
        else:
            channel_names = np.array([f"channel {i}" for i in range(c)])
    return {"images": images, "labels": labels, "label_order": order, "split": split,
            "channel_names": channel_names}


def fit_images_job(
    data: str | os.PathLike,
    out_dir: str | os.PathLike,
    images_key: str = "images",
    labels_key: str | None = None,
    split_key: str = "split",
    n_latent: int = 16,
    max_epochs: int = 30,
    batch_size: int = 128,
    beta: float = 1.0,
    likelihood: str = "gaussian",
    seed: int = 0,
    overwrite: bool = False,
    progress_bar: bool = True,
    n_threads: int | None = None,
    log=print,
) -> dict:
    """Run the image job end to end; return the metrics dict (also written to ``metrics.json``).

    Args mirror ``cellvae fit-images`` (see ``cellvae fit-images --help``); ``log`` receives progress lines.

    Raises:
        CellvaeInputError: unreadable data, missing keys, bad images, a bad output directory (raised before
            training), or too few training images.
        CellvaeTrainingError: training diverged; the best weights so far are saved to ``out_dir/model``.
    """
    t_start = time.perf_counter()
    path = Path(data).expanduser()
    d = load_image_npz(path, images_key=images_key, labels_key=labels_key, split_key=split_key)
    with OutputDir(out_dir, [path], IMAGE_OUTPUTS, overwrite) as out:
        return _images_job(path, d, out, images_key, labels_key, split_key, n_latent, max_epochs, batch_size, beta, likelihood,
                           seed, progress_bar, n_threads, log, t_start)


def _images_job(path: Path, d: dict, out: Path, images_key: str, labels_key: str | None, split_key: str,
                n_latent: int, max_epochs: int,
                batch_size: int, beta: float, likelihood: str, seed: int, progress_bar: bool, n_threads: int | None,
                log, t_start: float) -> dict:
    """The stages of :func:`fit_images_job` in a prepared, locked output directory."""
    from ..errors import CellvaeTrainingError

    images = to_float_images(d["images"], what=images_key)
    n, h, w, c = images.shape
    labels, order, channel_names = d["labels"], d["label_order"], d["channel_names"]
    log(f"read {path.name}: {n} images of {h}x{w} px, {c} channels"
        + (f", {len(order)} labels" if labels is not None else ""))
    if d["split"] is not None:
        split = d["split"]
        split_note = f"the file's {split_key!r} array"
    else:
        from ..models.image_vae import stratified_split

        tr_idx, _ = stratified_split(n, 0.8, seed, labels)
        split = np.full(n, "test", dtype="<U5")
        split[tr_idx] = "train"
        split_note = f"a seeded 80/20 split (seed {seed}{', stratified by label' if labels is not None else ''})"
    train, test = split == "train", split == "test"
    if train.sum() < 3:
        raise CellvaeInputError(f"Only {int(train.sum())} training images; at least 3 are needed.")
    if not test.any():
        test = train.copy()
        split_note += "; no test images, so the test metrics are on the training images"

    vae = ImageVAE(c, (h, w), n_latent=n_latent, likelihood=likelihood, beta=beta)
    log(f"training {vae!r} on {int(train.sum())} images")
    t0 = time.perf_counter()
    try:
        vae.train(images[train], labels=labels[train] if labels is not None else None, max_epochs=max_epochs,
                  batch_size=batch_size, seed=seed, progress_bar=progress_bar, n_threads=n_threads)
    except CellvaeTrainingError as e:
        vae.save(out / "model", overwrite=True)
        raise CellvaeTrainingError(f"{e} The model with these weights was saved to {str(out / 'model')!r}.",
                                   e.history) from e
    train_seconds = time.perf_counter() - t0
    hist = vae.history
    log(f"trained {len(hist['epoch'])} epochs in {train_seconds:.1f} s ({hist['train_cells_per_second']:.0f} "
        f"images/s); best epoch {hist['best_epoch']}")

    with torch_threads(n_threads):
        mean, var = vae.get_latent_representation(images, give_variance=True)
        parts = vae.get_elbo(images, n_samples=1, seed=seed, return_parts=True)
        recon_test = vae.reconstruct(images[test])
        # ---- metrics
        val = hist.get("validation_elbo") or []
        best = int(hist.get("best_epoch") or len(hist["epoch"]))
        mse = ((recon_test - images[test]) ** 2).mean(axis=(0, 1, 2))
        metrics: dict = {
            "n_images": int(n), "n_train": int(train.sum()), "n_test": int(test.sum()),
            "n_epochs": len(hist["epoch"]), "best_epoch": best, "stopped_early": bool(hist.get("stopped_early")),
            "validation_elbo": float(val[best - 1]) if val else None,
            "test_elbo": float(parts["elbo"][test].mean()),
            "test_reconstruction_loss": float(parts["reconstruction_loss"][test].mean()),
            "test_kl": float(parts["kl_local"][test].mean()),
            "test_mse_per_pixel": float(mse.mean()),
            **{f"test_mse_{_slug(nm)}": float(v) for nm, v in zip(channel_names, mse)},
            "train_seconds": round(train_seconds, 2),
            "train_images_per_second": round(float(hist["train_cells_per_second"]), 1),
        }
        if vae.module.likelihood == "gaussian":
            sd = vae.module.scale().detach().reshape(c, -1).mean(1).numpy()
            metrics.update({f"likelihood_sd_{_slug(nm)}": float(v) for nm, v in zip(channel_names, sd)})
        if labels is not None:
            metrics.update(_probe(mean, labels, train, test, seed))
            for lab in order:
                sel = test & (labels == lab)
                if sel.any():
                    metrics[f"test_elbo_{_slug(lab)}"] = float(parts["elbo"][sel].mean())

        # ---- figures
        vmax = np.maximum(np.percentile(images[train], 99.5, axis=(0, 1, 2)), 1e-3)
        fig_dir = out / "figures"
        figures = _figures(vae, images, labels, order, train, test, mean, recon_test, channel_names, vmax, hist,
                           fig_dir, seed)
    log(f"wrote {len(figures)} figures to {fig_dir}")

    settings = {
        "data": str(path), "images_key": images_key, "labels_key": labels_key or ("labels" if labels is not None
                                                                                  else None),
        "split": split_note, "n_latent": n_latent, "channels": vae.module_kwargs["channels"],
        "likelihood": likelihood, "variance": vae.module_kwargs["variance"], "beta": beta,
        "max_epochs": max_epochs, "kl_warmup_epochs": hist["plan"].get("n_epochs_kl_warmup")
        or max(1, min(400, max_epochs // 2)), "batch_size": batch_size, "seed": seed,
    }
    vae.save(out / "model", overwrite=True)
    arrays = {"latent_mean": mean, "latent_var": var, "elbo": parts["elbo"], "split": split}
    if labels is not None:
        arrays.update(labels=labels, label_names=np.asarray(order))
    write_atomic(out / "latent.npz", lambda p: _savez(p, arrays))
    metrics["total_seconds"] = round(time.perf_counter() - t_start, 2)
    write_text_atomic(out / "metrics.json", json.dumps({"settings": settings, "metrics": metrics}, indent=2))
    write_text_atomic(out / "report.html", _report(path.name, d, images.shape, settings, metrics, figures,
                                                  channel_names, split_note))
    log(f"wrote {out / 'report.html'}")
    return metrics


# ------------------------------------------------------------------------------------------------ helpers
def _slug(s: str) -> str:
    """'brightfield (Ch3)' -> 'brightfield', 'marker / DNA stain (Ch4)' -> 'DNA_stain' (short keys)."""
    s = str(s).split("(")[0].split("/")[-1].strip()
    return "_".join(s.split()) or "x"


def _savez(p: Path, arrays: dict) -> None:
    with open(p, "wb") as f:  # a file object: np.savez would append .npz to the temporary name
        np.savez_compressed(f, **arrays)


def _probe(mean: np.ndarray, labels: np.ndarray, train: np.ndarray, test: np.ndarray, seed: int) -> dict:
    """Linear probe: logistic regression (class_weight='balanced') on standardised latent means of the training
    images, balanced accuracy on the test images."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.preprocessing import StandardScaler

    if len(set(labels[train].tolist())) < 2:
        return {}
    sc = StandardScaler().fit(mean[train])
    clf = LogisticRegression(class_weight="balanced", max_iter=5000, random_state=seed)
    clf.fit(sc.transform(mean[train]), labels[train])
    pred = clf.predict(sc.transform(mean[test]))
    return {"probe_balanced_accuracy": float(balanced_accuracy_score(labels[test], pred))}


def _figures(vae, images, labels, order, train, test, mean, recon_test, channel_names, vmax, hist, fig_dir,
             seed) -> list[tuple[Path, str]]:
    from ..plot import plot_training_curves, save_figure

    figs = []
    fig = plot_training_curves(hist)
    fig.axes[0].set_ylabel("ELBO (nats per image)")
    figs.append((save_figure(fig, fig_dir / "training_curves.png"),
                 "Training and validation ELBO (nats per image) per epoch, and the KL warm-up."))

    # reconstructions of test images, N_RECON_PER_LABEL per label in label order
    test_idx = np.flatnonzero(test)
    rng = np.random.default_rng(seed)
    if labels is not None:
        pick, names = [], []
        for lab in order:
            cand = np.flatnonzero(labels[test_idx] == lab)
            for j in rng.permutation(cand)[:N_RECON_PER_LABEL]:
                pick.append(j)
                names.append(lab)
        pick, names = np.array(pick[:N_RECON_MAX], dtype=int), names[:N_RECON_MAX]
    else:
        pick = np.sort(rng.permutation(len(test_idx))[:N_RECON_MAX])
        names = [str(test_idx[j]) for j in pick]
    rows, row_names = [], []
    for ch, nm in enumerate(channel_names):
        rows += [images[test_idx[pick], :, :, ch], recon_test[pick, :, :, ch]]
        row_names += [f"{_slug(nm)}\noriginal", f"{_slug(nm)}\nreconstr."]
    fig = _image_table(rows, row_names, names, [vmax[i // 2] for i in range(len(rows))],
                       "Test images (original) and reconstructions (decoded posterior mean), per channel")
    figs.append((save_figure(fig, fig_dir / "reconstructions.png"),
                 "Held-out test images beside their reconstructions E[x | z = E q(z|x)], one grayscale row per "
                 "channel (display range 0 to the 99.5th percentile of the channel)."))

    # decoded grid over the two leading principal directions of the training images' latent means
    zt = mean[train]
    center = zt.mean(0)
    _, s, vt = np.linalg.svd(zt - center, full_matrices=False)
    sd = s[:2] / np.sqrt(max(len(zt) - 1, 1))
    ticks = np.linspace(-GRID_LIMIT, GRID_LIMIT, GRID_STEPS)
    zz = np.array([center + b * sd[1] * vt[1] + a * sd[0] * vt[0] for b in ticks[::-1] for a in ticks])
    grid = vae.decode(zz).reshape(GRID_STEPS, GRID_STEPS, *images.shape[1:])
    fig = _grid_figure(grid, ticks, channel_names, vmax)
    figs.append((save_figure(fig, fig_dir / "latent_grid.png"),
                 f"Images decoded on a {GRID_STEPS}x{GRID_STEPS} grid through the mean latent code along the two "
                 f"leading principal directions of the training images' latent means (+-{GRID_LIMIT:g} sd), one "
                 "panel per channel."))

    # interpolation between two label means
    present = [x for x in order if (labels[train] == x).any()] if labels is not None else []
    if len(present) >= 2:
        a, b = (PREFERRED_INTERPOLATION if all(x in present for x in PREFERRED_INTERPOLATION)
                else (present[0], present[-1]))
        za, zb = zt[labels[train] == a].mean(0), zt[labels[train] == b].mean(0)
        caption_ends = f"the mean latent codes of the {a} and {b} training images"
    else:
        za, zb = center - sd[0] * vt[0] * GRID_LIMIT, center + sd[0] * vt[0] * GRID_LIMIT
        a, b = "PC1 -", "PC1 +"
        caption_ends = f"-{GRID_LIMIT:g} and +{GRID_LIMIT:g} sd along the first principal direction"
    path = vae.interpolate(za, zb, N_INTERP)
    t = np.linspace(0, 1, N_INTERP)
    rows = [path[:, :, :, ch] for ch in range(images.shape[-1])]
    fig = _image_table(rows, [_slug(x) for x in channel_names], [f"t={v:.2f}" for v in t], list(vmax),
                       f"Decoded latent interpolation {a} -> {b}")
    figs.append((save_figure(fig, fig_dir / "interpolation.png"),
                 f"Decoded straight latent path between {caption_ends} (t = 0 to 1), one row per channel."))

    # latent means coloured by label
    figs.append((save_figure(_scatter(mean, labels, order, center, vt), fig_dir / "latent_pca.png"),
                 "Latent means of all images projected on the two leading principal directions of the training "
                 "latent means" + (", coloured by label; large markers: label means, joined in label order."
                                   if labels is not None else ".")))

    # samples: from the prior, and from a Gaussian fitted to the training images' aggregate posterior
    prior = vae.sample(N_SAMPLES, seed=seed)
    agg = vae.sample(N_SAMPLES, seed=seed, images=images[train])
    rows, row_names = [], []
    for name, smp in (("prior", prior), ("aggregate", agg)):
        for ch in range(images.shape[-1]):
            rows.append(smp[:, :, :, ch])
            row_names.append(f"{name}\n{_slug(channel_names[ch])}")
    fig = _image_table(rows, row_names, [str(i + 1) for i in range(N_SAMPLES)],
                       list(vmax) * 2, "Decoded latent draws: prior N(0, I) (top), aggregate posterior (bottom)")
    figs.append((save_figure(fig, fig_dir / "samples.png"),
                 "Decoded latent draws (likelihood means), one row per channel: top, from the prior z ~ N(0, I); "
                 "bottom, from the Gaussian fitted to the aggregate posterior of the training images "
                 "(ImageVAE.sample(n, images=...)). Prior draws that decode to implausible images show where the "
                 "prior puts mass between the training codes."))
    return figs


def _image_table(rows, row_names, col_names, vmaxes, title):
    """One grayscale image per cell of a table: rows[i] is (n_cols, H, W)."""
    import matplotlib.pyplot as plt

    nr, nc = len(rows), len(rows[0])
    fig, axes = plt.subplots(nr, nc, figsize=(0.75 * nc + 1.0, 0.78 * nr + 0.6), squeeze=False)
    for i in range(nr):
        for j in range(nc):
            ax = axes[i, j]
            ax.imshow(rows[i][j], cmap="gray", vmin=0.0, vmax=float(vmaxes[i]), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(str(col_names[j]), fontsize=7)
            if j == 0:
                ax.set_ylabel(row_names[i], fontsize=7, rotation=0, ha="right", va="center")
    fig.suptitle(title, fontsize=9)
    fig.subplots_adjust(wspace=0.04, hspace=0.06)
    return fig


def _montage(tiles: np.ndarray, pad: int = 1, fill: float = 1.0) -> np.ndarray:
    """(rows, cols, H, W) -> one 2-D image with ``pad`` px separators."""
    r, c, h, w = tiles.shape
    out = np.full((r * (h + pad) + pad, c * (w + pad) + pad), fill, dtype=np.float32)
    for i in range(r):
        for j in range(c):
            out[pad + i * (h + pad):pad + i * (h + pad) + h, pad + j * (w + pad):pad + j * (w + pad) + w] = tiles[i, j]
    return out


def _grid_figure(grid: np.ndarray, ticks: np.ndarray, channel_names, vmax):
    import matplotlib.pyplot as plt

    steps, _, h, w, c = grid.shape
    fig, axes = plt.subplots(1, c, figsize=(4.3 * c, 4.6), squeeze=False)
    pos = [1 + i * (h + 1) + h / 2 for i in range(steps)]
    for ch in range(c):
        ax = axes[0, ch]
        ax.imshow(_montage(grid[..., ch] / vmax[ch], fill=1.0).clip(0, 1), cmap="gray", vmin=0, vmax=1,
                  interpolation="nearest")
        ax.set_xticks(pos)
        ax.set_xticklabels([f"{v:+.1f}" for v in ticks], fontsize=6)
        ax.set_yticks(pos)
        ax.set_yticklabels([f"{v:+.1f}" for v in ticks[::-1]], fontsize=6)
        ax.set_xlabel("latent PC1 (sd)")
        ax.set_ylabel("latent PC2 (sd)")
        ax.set_title(str(channel_names[ch]), fontsize=9)
    fig.suptitle("Decoded latent grid (two leading principal directions of the latent means)", fontsize=10)
    fig.tight_layout()
    return fig


def _scatter(mean, labels, order, center, vt):
    import matplotlib.pyplot as plt

    p = (mean - center) @ vt[:2].T
    fig, ax = plt.subplots(figsize=(6.4, 5.2))
    if labels is None:
        ax.scatter(p[:, 0], p[:, 1], s=3, alpha=0.5, lw=0)
    else:
        counts = {lab: int((labels == lab).sum()) for lab in order}
        cmap = plt.get_cmap("tab10")
        # most frequent labels first, so rare ones are drawn on top
        for lab in sorted(order, key=lambda x: -counts[x]):
            k = order.index(lab)
            sel = labels == lab
            small = counts[lab] < 200
            ax.scatter(p[sel, 0], p[sel, 1], s=14 if small else 3, alpha=0.9 if small else 0.35, lw=0,
                       color=cmap(k % 10), label=f"{lab} ({counts[lab]})")
        cm = np.array([p[labels == lab].mean(0) for lab in order])
        ax.plot(cm[:, 0], cm[:, 1], "-", color="k", lw=1, alpha=0.6)
        for k, lab in enumerate(order):
            ax.scatter(cm[k, 0], cm[k, 1], s=110, color=cmap(k % 10), edgecolor="k", lw=1.2, zorder=5)
        ax.legend(markerscale=2, fontsize=7, loc="best", frameon=False)
    ax.set_xlabel("latent PC1")
    ax.set_ylabel("latent PC2")
    ax.set_title("Latent means (all images)")
    fig.tight_layout()
    return fig


def _report(title: str, d: dict, shape, settings: dict, metrics: dict, figures, channel_names, split_note) -> str:
    """A standalone HTML page: data, settings, metrics table, one figure per row (base64 PNG)."""
    from .report import _CSS, _img, _table

    n, h, w, c = shape
    data_rows = {"file": title, "images": n, "size (px)": f"{h} x {w}", "channels": ", ".join(channel_names),
                 "split": split_note}
    if d["labels"] is not None:
        data_rows["labels"] = ", ".join(f"{lab} ({int((d['labels'] == lab).sum())})" for lab in d["label_order"])
    figs = "".join(_img(p, cap) for p, cap in figures if Path(p).exists())
    notes = [
        "Model: convolutional VAE (Kingma & Welling 2014) with a Gaussian likelihood on intensities in [0, 1] and a "
        "learned standard deviation per channel (or a continuous Bernoulli, Loaiza-Ganem & Cunningham 2019); KL "
        "weight warmed up to beta (Higgins et al. 2017).",
        "ELBO, reconstruction loss and KL are in nats per image (a density on [0, 1]^(C H W), so the ELBO can be "
        "positive); MSE is per pixel and channel on the [0, 1] scale.",
        "probe_balanced_accuracy: logistic regression (class_weight='balanced') on standardised latent means of "
        "the training images, balanced accuracy on the test images.",
        "Latent codes of every image: latent.npz (latent_mean, latent_var, elbo, split, labels).",
    ]
    notes_html = "".join(f"<li>{html.escape(x)}</li>" for x in notes)
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>cellvae image report: {html.escape(title)}</title><style>{_CSS}</style>
</head><body>
<h1>cellvae image report</h1><p class=muted>{html.escape(title)}</p>
<h2>Data</h2>{_table(data_rows)}
<h2>Settings</h2>{_table(settings)}
<h2>Metrics</h2>{_table(metrics)}
<h2>Figures</h2><div class=figs>{figs}</div>
<h2>Notes</h2><ul>{notes_html}</ul>
</body></html>
"""
