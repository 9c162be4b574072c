# `make demo` and `make test` each create .venv on first use and install cm3jax into it
# (again whenever setup.py changes). `make test` adds the [test], [parity] and [tf] extras:
# pytest and hypothesis, the CPU torch 2.13.0 + transformers reference models, TFDS (without
# TensorFlow), plus taming-transformers (installed without its dependencies) for the VQ-GAN
# parity tests.
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
	touch $@

# The main job on 8 simulated CPU devices, as a (data, fsdp, tensor) = (2, 2, 2) mesh: train the
# tiny LM on the synthetic task from scratch in runs/demo (metrics.jsonl, tensorboard/, checkpoints/).
DEMO_DIR := runs/demo
demo: $(BASE)
	rm -rf $(DEMO_DIR)
	XLA_FLAGS=--xla_force_host_platform_device_count=8 $(BIN)/cm3jax train \
		--config=configs/lm.py:tiny --config.mesh.ici='(2,2,2)' --workdir=$(DEMO_DIR)

test: $(TEST)
	$(BIN)/python -m pytest -q -n 2 --dist loadgroup --durations=20 tests

clean:
	rm -rf $(VENV) .pytest_cache
