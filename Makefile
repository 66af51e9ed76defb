# cellvae: set-up, demo, tests, benchmarks.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
export CELLVAE_DATA_DIR ?= $(abspath ../shared/data)

.PHONY: install demo test bench-install bench bench-time-to-quality bench-clustering bench-integration \
	bench-imputation bench-large bench-throughput clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install torch==2.13.0
	$(PIP) install -e '.[dev]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/cellvae demo --out demo_out

test: install
	$(PY) -m pytest -q

# Peer benchmark (scvi-tools 1.4.2) in a separate environment so the package's own stays lean.
.venv-bench/.installed: pyproject.toml
	$(PYTHON) -m venv .venv-bench
	.venv-bench/bin/python -m pip -q install torch==2.13.0
	echo "torch==2.13.0" > .venv-bench/constraints.txt
	.venv-bench/bin/python -m pip -q install -c .venv-bench/constraints.txt -e '.[bench]'
	touch $@

bench-install: .venv-bench/.installed

# cellvae vs scvi-tools on every labelled dataset of $(CELLVAE_DATA_DIR): speed, peak RSS, held-out ELBO /
# log p(x) / reconstruction error, ARI/NMI (3 seeds, 100 epochs, K=1000; about 1-2 h on one thread).
# Add BENCH_ARGS=--resume to continue an interrupted run.
bench: bench-install
	.venv-bench/bin/python benchmarks/vs_scvi.py --data-dir $(CELLVAE_DATA_DIR) \
		--out benchmarks/results/vs_scvi.md --json benchmarks/results/vs_scvi.json $(BENCH_ARGS)

# Wall time to reach scvi-tools' final held-out ELBO.
bench-time-to-quality: bench-install
	.venv-bench/bin/python benchmarks/vs_scvi.py --time-to-quality --data-dir $(CELLVAE_DATA_DIR) \
		--out benchmarks/results/vs_scvi_time_to_quality.md \
		--json benchmarks/results/vs_scvi_time_to_quality.json $(BENCH_ARGS)

# Likelihood metrics against scvi-tools' own with scvi-tools' weights copied into a CountVAE (about 2 min).
bench-crosscheck: bench-install
	.venv-bench/bin/python benchmarks/crosscheck_scvi.py

# Leave-one-cell-type-out anomaly AUROC on every labelled dataset (about 30 min).
bench-anomaly: $(VENV)/.installed
	$(PY) benchmarks/anomaly_loo.py $(BENCH_ARGS)

# Clustering quality only (KMeans ARI/NMI), each tool's own 90 % split.
bench-clustering: bench-install
	.venv-bench/bin/python benchmarks/clustering_vs_scvi.py $(BENCH_ARGS)

# Batch integration with scib-metrics: cellvae (with / without the adversary), scvi-tools, PCA (about 1.5 h).
bench-integration: bench-install
	.venv-bench/bin/python benchmarks/integration.py $(BENCH_ARGS)

# Imputation of hidden counts (scVI paper protocol), cellvae vs scvi-tools (about 1.5 h).
bench-imputation: bench-install
	.venv-bench/bin/python benchmarks/imputation.py $(BENCH_ARGS)

# Generated 100,000-cell set for the throughput benchmark (a few minutes).
LARGE ?= benchmarks/data/large_100000.h5ad
$(LARGE): | $(VENV)/.installed
	$(PY) benchmarks/make_large.py --n-cells 100000 --out $(LARGE)

bench-large: $(LARGE)

# Training throughput, time to scvi quality and peak RSS vs scvi-tools (about 20 min).
bench-throughput: bench-install bench-large
	.venv-bench/bin/python benchmarks/throughput.py --large-path $(LARGE) $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .venv-bench demo_out
