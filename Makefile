# Two commands on a fresh machine: `make demo` (install + run the embedded study), `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
CORES ?= all

.PHONY: install demo demo-seeds test bench clean-results

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

# The seed-to-seed spread of the findings' key numbers: the demo's key cells again with
# training seeds $(SEEDS) (same images), then results/analysis/seed_spread.csv and a findings
# page that puts the spread beside every effect. Run after `make demo`.
SEEDS ?= 1 2
demo-seeds: install
	@for s in $(SEEDS); do \
	  $(PY) -m mimlib seed-study --config config/config.yaml --seed $$s --out results/seeds/seed$$s.yaml > results/seeds.targets && \
	  $(VENV)/bin/snakemake --cores $(CORES) --configfile results/seeds/seed$$s.yaml -- $$(cat results/seeds.targets) || exit 1; \
	done
	$(PY) -m mimlib seed-spread --config config/config.yaml --seeds $(SEEDS)
	$(VENV)/bin/snakemake --cores $(CORES) results/analysis/findings.md

test: install
	$(PY) -m pytest -q

bench: install
	$(PY) benchmarks/bench_pretrain.py
	$(PY) benchmarks/bench_decode.py

clean-results:
	rm -rf results .snakemake
