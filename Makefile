# `make demo` and `make test` each create .venv on first use and install cm3jax into it.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cksum setup.py | cut -d' ' -f1)

.PHONY: demo test clean

$(STAMP): setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	rm -f $(VENV)/.installed-* && touch $@

# The showcase on 8 simulated CPU devices, as a (data, fsdp, tensor) = (2, 2, 2) mesh.
demo: $(STAMP)
	XLA_FLAGS=--xla_force_host_platform_device_count=8 $(BIN)/cm3jax quickstart \
		--config=configs/lm.py:tiny --config.mesh.ici='(2,2,2)'

test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 tests

clean:
	rm -rf $(VENV) .pytest_cache
