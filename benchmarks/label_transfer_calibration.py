#!/usr/bin/env python
"""Temperature rules for LabelTransferVAE's confidences, compared offline on the same trained models (issue 24).

``run SEEDS`` trains cellvae on every split of ``benchmarks/label_transfer.py`` exactly as that benchmark does
(its ``prepare`` and ``train_cellvae``, one thread) and saves, per (split, seed), the raw classifier logits of the query cells,
of the held-out (validation) reference cells and their label codes, and the fitted temperature, to ``--out``
(one ``.npz`` each; existing files are skipped). ``report`` computes the query ECE (15 bins, cells whose type the
reference knows) under each rule from those logits and compares it with scANVI's rows of ``label_transfer.json``:

- ``model's fit``: the temperature the model fitted (NLL on all its held-out labelled cells, since commit 87f4998;
  before it, on one seeded half of them);
- ``T>=1``: that temperature, never below 1 (only softening);
- ``T=1``: no scaling;
- ``all held-out``: NLL fit on all held-out labelled cells;
- ``all, T>=1``: the same, never below 1.

    .venv-bench/bin/python benchmarks/label_transfer_calibration.py run 0,1,2 --out /tmp/ltcal
    .venv-bench/bin/python benchmarks/label_transfer_calibration.py report --out /tmp/ltcal
"""
from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import label_transfer as L  # noqa: E402
from _common import default_data_dir  # noqa: E402

RULES = ["model's fit", "T>=1", "T=1", "all held-out", "all, T>=1"]


def run(seeds: list[int], out: Path) -> None:
    import numpy as np
    import torch

    torch.set_num_threads(1)
    out.mkdir(parents=True, exist_ok=True)
    for seed in seeds:
        for i, sp in enumerate(L.splits(default_data_dir())):
            path = out / f"{i:02d}_{seed}.npz"
            if path.exists():
                continue
            ref, query, truth, lk, bk, unscored = L.prepare(default_data_dir(), sp)
            _, lt, mapped, _, _ = L.train_cellvae(ref, query, lk, bk, seed)
            _, qlog = mapped._latent_and_logits(None, None)
            _, vlog = lt._latent_and_logits(None, lt.validation_indices)
            vcodes = lt.spec.label_codes(lt.adata)[np.asarray(lt.validation_indices)]
            np.savez(path, qlog=qlog, truth=truth.astype(str), vlog=vlog, vcodes=vcodes, labels=np.asarray(lt.labels),
                     T=lt.temperature, split=sp["split"], unscored=np.asarray(list(unscored), dtype=str))
            print(i, seed, sp["split"], "T", round(lt.temperature, 3), flush=True)


def report(out: Path) -> None:
    import numpy as np

    from cellvae.metrics.calibration import expected_calibration_error, fit_temperature, softmax

    ece = collections.defaultdict(dict)
    for f in sorted(glob.glob(str(out / "*.npz"))):
        d = np.load(f)
        labels, truth = list(d["labels"]), d["truth"]
        known = np.isin(truth, labels) & ~np.isin(truth, list(d["unscored"]))
        codes = np.array([labels.index(t) for t in truth[known]])
        q = d["qlog"][known]
        vk = d["vcodes"] < len(labels)
        t_all = fit_temperature(d["vlog"][vk], d["vcodes"][vk])
        t0 = float(d["T"])
        temps = dict(zip(RULES, (t0, max(1.0, t0), 1.0, t_all, max(1.0, t_all))))
        seed = int(Path(f).stem.split("_")[1])
        for k, t in temps.items():
            ece[(str(d["split"]), k)][seed] = expected_calibration_error(softmax(q, t), codes)
    scvi = {}
    for r in json.loads((L.RESULTS / "label_transfer.json").read_text())["rows"]:
        if r["tool"] == "scvi":
            scvi.setdefault(r["split"], {})[r["seed"]] = r["ece"]
    print("| split | seeds | " + " | ".join(RULES) + " | scANVI |")
    print("|---|---|" + "---|" * (len(RULES) + 1))
    wins = collections.Counter()
    for s in sorted({k[0] for k in ece}):
        seeds = sorted(ece[(s, RULES[0])])
        m = {k: float(np.mean([ece[(s, k)][i] for i in seeds])) for k in RULES}
        sv = float(np.mean([scvi[s][i] for i in seeds]))
        wins.update(k for k in RULES if m[k] <= sv)
        print(f"| {s} | {','.join(map(str, seeds))} | " + " | ".join(f"{m[k]:.4f}" for k in RULES) + f" | {sv:.4f} |")
    print("\nsplits with ECE <= scANVI: " + ", ".join(f"{k}: {wins[k]}" for k in RULES))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=["run", "report"])
    p.add_argument("seeds", nargs="?", default="0,1,2")
    p.add_argument("--out", default=os.environ.get("TMPDIR", "/tmp") + "/ltcal")
    a = p.parse_args(argv)
    if a.what == "run":
        run([int(s) for s in a.seeds.split(",")], Path(a.out))
    else:
        report(Path(a.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
