# sleepserve — `make serve` starts the server on the shipped model; `make test` runs every test.
VENV ?= .venv
PY := $(VENV)/bin/python
RUNTIME := $(VENV)/.runtime-stamp
DEV := $(VENV)/.dev-stamp
CHECKPOINT ?= checkpoints/sleepy-mix
# The project's own Python files (a scratch file beside them is not linted); "." outside a git checkout.
PY_FILES := $$(git ls-files '*.py' 2>/dev/null | grep . || echo .)

.PHONY: install install-dev system-deps serve test lint format train eval checkpoint reproduce bench clean

# Runtime packages only (what `make serve` needs); torch first, the CPU build where no NVIDIA GPU is
# (scripts/install_torch.py). pip shows what it fetches: a first install takes a minute or more.
$(RUNTIME): pyproject.toml
	@test -x $(PY) || { echo "creating the virtual environment $(VENV)"; python3 -m venv $(VENV) \
		|| { rm -rf $(VENV); echo "python3 -m venv failed: on Debian or Ubuntu, apt-get install python3-venv (make system-deps)"; exit 1; }; }
	$(PY) -m pip install --upgrade pip
	$(PY) scripts/install_torch.py
	$(PY) -m pip install -e .
	touch $@

# The test and lint tools on top (pytest, ruff, openai, transformers, …).
$(DEV): $(RUNTIME)
	$(PY) -m pip install -e '.[dev]'
	touch $@

install: $(RUNTIME)

install-dev: $(DEV)

# python3-venv (Debian and Ubuntu ship venv without ensurepip); tests start a real redis-server on a
# free port (apt; needs root). kubectl renders the Kubernetes
# manifests in the deploy tests; stock Debian and Ubuntu have no package of it, so it is downloaded
# from dl.k8s.io into the venv where it is not on PATH; where that fails, those tests are skipped
# with the reason (CI requires them: SLEEPSERVE_REQUIRE_KUBECTL=1).
system-deps:
	@python3 -c "import ensurepip" 2>/dev/null || { apt-get update && apt-get install -y python3-venv; }
	@command -v redis-server >/dev/null || { apt-get update && apt-get install -y redis-server; }
	@command -v kubectl >/dev/null || test -x $(VENV)/bin/kubectl || python3 scripts/get_kubectl.py $(VENV)/bin \
		|| echo "kubectl is missing: the tests that render the Kubernetes manifests will be skipped"

# The server picks its torch threads and sleep settings itself (server/settings.py: torch_threads,
# sleep_worker, cpu_affinity), as the Docker image and the Kubernetes manifests run it.
serve: install
	$(VENV)/bin/sleepserve serve --checkpoint $(CHECKPOINT)

test: $(DEV) system-deps
	@start=$$(date +%s); status=0; \
	$(VENV)/bin/ruff check $(PY_FILES) && $(VENV)/bin/ruff format --check $(PY_FILES) \
		&& $(VENV)/bin/pytest -q || status=$$?; \
	echo "make test: $$(( $$(date +%s) - start )) s"; exit $$status

lint: $(DEV)
	$(VENV)/bin/ruff check $(PY_FILES)
	$(VENV)/bin/ruff format --check $(PY_FILES)

format: $(DEV)
	$(VENV)/bin/ruff format $(PY_FILES)
	$(VENV)/bin/ruff check --fix $(PY_FILES)

train: install
	$(VENV)/bin/sleepserve train $(ARGS)

eval: install
	$(VENV)/bin/sleepserve eval --checkpoint $(CHECKPOINT) $(ARGS)

checkpoint: install
	$(PY) -m model.train --preset checkpoint --out $(CHECKPOINT)

reproduce: install
	$(PY) -m bench.reproduce

bench: $(DEV) system-deps
	$(PY) -m bench.suite
	$(PY) -m bench.training_curves

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
