# cellvae: set-up, demo, tests, benchmarks.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
export CELLVAE_DATA_DIR ?= $(abspath ../shared/data)

.PHONY: install demo test bench-install bench clean

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

bench: bench-install
	.venv-bench/bin/python benchmarks/clustering_vs_scvi.py

clean:
	rm -rf $(VENV) .venv-bench demo_out
