# sleepserve — `make serve` starts the server on the shipped model; `make test` runs every test.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
CHECKPOINT ?= checkpoints/sleepy-mix

.PHONY: install system-deps serve test lint format train eval checkpoint reproduce bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# Tests start a real redis-server on a free port; kubectl renders the Kubernetes manifests.
system-deps:
	@command -v redis-server >/dev/null || { apt-get update -qq && apt-get install -y -qq redis-server; }
	@command -v kubectl >/dev/null || { apt-get update -qq && apt-get install -y -qq kubectl; }

# One torch thread unless set: the shipped model's ops are too small to split (a decode step 0.85 ms
# on one thread, 0.91 on two, on 2 cores: a throwaway timing), and then the server's threads share a
# core (cpu_affinity).
serve: install
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(VENV)/bin/sleepserve serve --checkpoint $(CHECKPOINT)

test: install system-deps
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/pytest -q

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

train: install
	$(VENV)/bin/sleepserve train $(ARGS)

eval: install
	$(VENV)/bin/sleepserve eval --checkpoint $(CHECKPOINT) $(ARGS)

checkpoint: install
	$(PY) -m model.train --preset checkpoint --out $(CHECKPOINT)

reproduce: install
	$(PY) -m bench.reproduce

bench: install system-deps
	$(PY) -m bench.suite
	$(PY) -m bench.training_curves

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
