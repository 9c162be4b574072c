# `make demo` and `make test` each create .venv on first use and install cm3jax into it
# (again whenever setup.py changes). `make test` adds the [test], [parity] and [tf] extras:
# pytest and hypothesis, the CPU torch 2.13.0 + transformers reference models, TFDS (without
# TensorFlow), torchmetrics and pycocoevalcap (FID and CIDEr references), plus taming-transformers
# and torch-fidelity (installed without their dependencies) for the VQ-GAN and Inception parity tests.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
HASH := $(shell cksum setup.py | cut -d' ' -f1)
BASE := $(VENV)/.base-$(HASH)
TEST := $(VENV)/.test-$(HASH)

.PHONY: demo test clean

$(BASE): setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e .
	touch $@

$(TEST): $(BASE)
	$(BIN)/python -m pip install -q -e '.[test,parity,tf]'
	# taming-transformers' own requirements (lightning, ...) are not needed for its model modules
	$(BIN)/python -m pip install -q --no-deps taming-transformers==0.0.1
	# torch-fidelity's Inception extractor needs only torch; the torchvision it asks for does not
	# import beside CPU torch 2.13.0 (and would break transformers' imports)
	$(BIN)/python -m pip install -q --no-deps torch-fidelity==0.4.0
	touch $@

# The main job: tokenizers, data, retriever and LM trained from nothing on the Shapes world, then
# pictures drawn from captions and captions written for pictures, all judged. Writes out/quickstart/
# (samples.png, captions.md, report.md, report.json, TensorBoard logs); a second run reuses the
# finished stages, and an interrupted one continues where it stopped.
demo: $(BASE)
	$(BIN)/cm3jax quickstart --config=configs/quickstart.py

test: $(TEST)
	$(BIN)/python -m pytest -q -n 2 --dist loadgroup --durations=20 tests

clean:
	rm -rf $(VENV) .pytest_cache
