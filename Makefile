# Two commands on a fresh machine: `make demo` (install + run the embedded study), `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
CORES ?= all

.PHONY: install demo test bench clean-results

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# The pinned torch/torchvision pair (CPU here, CUDA builds on GPU machines).
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/snakemake --cores $(CORES)

test: install
	$(PY) -m pytest -q

bench: install
	$(PY) benchmarks/bench_pretrain.py
	$(PY) benchmarks/bench_decode.py

clean-results:
	rm -rf results .snakemake
