# cellvae: set-up, demo, tests, benchmarks.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
export CELLVAE_DATA_DIR ?= $(abspath ../shared/data)

.PHONY: install demo test docs docs-serve docs-install test-native-sanitize bench-install bench bench-time-to-quality bench-integration \
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

# The documentation site (mkdocs-material + mkdocstrings; docs/build.py executes the tutorials of docs/tutorials/
# into docs/generated/ first, and renders benchmarks/results/*.md and the CLI help). Strict: a broken link, nav
# entry or API reference fails the build. DOCS_ARGS=--force re-executes unchanged tutorials.
$(VENV)/.docs-installed: pyproject.toml | $(VENV)/.installed
	$(PIP) install -e '.[docs]'
	touch $@

docs-install: $(VENV)/.docs-installed

docs: install docs-install
	$(PY) docs/build.py $(DOCS_ARGS)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

docs-serve: install docs-install
	$(PY) docs/build.py $(DOCS_ARGS)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs serve

# The native kernels built with -fsanitize=address,undefined (their own cache), and the tests that exercise them,
# malformed CSR input included, in a process that preloads the sanitizer runtimes. Any finding aborts the run.
SANITIZE_ENV = CELLVAE_NATIVE_SANITIZE=1 CELLVAE_CACHE_DIR=$(abspath .cache/sanitize) \
	LD_PRELOAD="$$($(CC_SAN) -print-file-name=libasan.so) $$($(CC_SAN) -print-file-name=libubsan.so)" \
	ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1
CC_SAN ?= gcc
test-native-sanitize: install
	$(SANITIZE_ENV) $(PY) -m pytest -q -p no:cacheprovider tests/test_native.py tests/test_malformed_csr.py tests/test_threads.py \
		tests/test_sparse_path.py tests/test_fast_path.py \
		tests/test_rna_protein.py::test_fused_protein_elbo_terms_equal_the_composed_form \
		tests/test_rna_protein.py::test_native_protein_kernel_refuses_bad_input_before_touching_memory \
		tests/test_rna_protein.py::test_module_sparse_minibatch_equals_dense

# Peer benchmark (scvi-tools 1.5.1, which needs Python >= 3.12) in a separate environment so the
# package's own stays lean. BENCH_PYTHON may be a path or a command; if it is neither there nor on
# PATH, python3.12 from PATH is used. torch is pinned by a constraints file so scvi-tools keeps it.
BENCH_PYTHON ?= /root/.pyenv/versions/3.12.1/bin/python3.12
BENCH_PY := $(or $(wildcard $(BENCH_PYTHON)),$(shell command -v $(BENCH_PYTHON) 2>/dev/null),python3.12)
BENCH_TORCH ?= 2.13.0
BENCH_PIP := .venv-bench/bin/python -m pip --disable-pip-version-check -q

.venv-bench/.installed: pyproject.toml
	@$(BENCH_PY) -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null || { \
		echo "bench-install: '$(BENCH_PY)' is missing or older than Python 3.12 (scvi-tools 1.5 needs it);" \
			"set BENCH_PYTHON=/path/to/python3.12" >&2; exit 1; }
	@# An environment made by another Python (e.g. an old 3.11 one) is replaced, not patched.
	@if [ "$$(.venv-bench/bin/python -c 'import sys; print(sys.version)' 2>/dev/null)" != \
		"$$($(BENCH_PY) -c 'import sys; print(sys.version)')" ]; then \
		echo "rm -rf .venv-bench && $(BENCH_PY) -m venv .venv-bench"; \
		rm -rf .venv-bench && $(BENCH_PY) -m venv .venv-bench; fi
	echo "torch==$(BENCH_TORCH)" > .venv-bench/constraints.txt
	$(BENCH_PIP) install -c .venv-bench/constraints.txt torch==$(BENCH_TORCH)
	$(BENCH_PIP) install -c .venv-bench/constraints.txt -e '.[bench]'
	touch $@

bench-install: .venv-bench/.installed
	@.venv-bench/bin/python -c 'import sys, importlib.metadata as md; \
		d = {x.metadata["Name"].lower(): x.version for x in md.distributions()}; \
		print("bench env: Python " + sys.version.split()[0], *(p + " " + d.get(p, "-") for p in \
		("torch", "scvi-tools", "scib-metrics", "lightning", "jax", "cellvae")), sep=", ")'

# cellvae vs scvi-tools on every labelled dataset of $(CELLVAE_DATA_DIR): speed, peak RSS, held-out ELBO /
# log p(x) / reconstruction error, ARI/NMI (3 seeds, 100 epochs, K=1000; about 1-2 h on one thread).
# Add BENCH_ARGS=--resume to continue an interrupted run.
bench: bench-install
	.venv-bench/bin/python benchmarks/vs_scvi.py --data-dir $(CELLVAE_DATA_DIR) \
		--out benchmarks/results/vs_scvi.md --json benchmarks/results/vs_scvi.json $(BENCH_ARGS)

# Wall time to reach scvi-tools' final held-out ELBO.
bench-time-to-quality: bench-install
	.venv-bench/bin/python benchmarks/throughput.py --mode ttq --data-dir $(CELLVAE_DATA_DIR) $(BENCH_ARGS)

# Likelihood metrics against scvi-tools' own with scvi-tools' weights copied into a CountVAE (about 2 min).
bench-crosscheck: bench-install
	.venv-bench/bin/python benchmarks/crosscheck_scvi.py

# Leave-one-cell-type-out anomaly AUROC on every labelled dataset (about 30 min).
bench-anomaly: $(VENV)/.installed
	$(PY) benchmarks/anomaly_loo.py $(BENCH_ARGS)

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
bench-throughput: bench-install
	.venv-bench/bin/python benchmarks/throughput.py --data-dir $(CELLVAE_DATA_DIR) $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .venv-bench demo_out site docs/generated
