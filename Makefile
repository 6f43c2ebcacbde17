# The README's two commands: `make demo` and `make test`. Both bootstrap .venv themselves.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.mtrec-installed
UV_VERSION := 0.13.9

.PHONY: demo test test-fast bench lint install clean compile-pipeline k8s-check

install: $(STAMP)

# torch first: `pip install torch==2.13.0` takes the CPU build on disk (any other torch pulls CUDA);
# then the locked set without resolution, then mtrec itself. Skipped when nothing changed.
$(STAMP): requirements.lock pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check torch==2.13.0 uv==$(UV_VERSION)
	$(BIN)/uv pip install --quiet --python $(BIN)/python --no-deps -r requirements.lock
	$(BIN)/uv pip install --quiet --python $(BIN)/python --no-deps -e .
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/mtrec quickstart

test: $(STAMP)
	@if [ -x scripts/ensure_chromium.sh ]; then scripts/ensure_chromium.sh; fi
	$(BIN)/python -m pytest -q -rs --durations=15

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

bench: $(STAMP)
	@for b in bench/bench_*.py; do echo "# $$b" >&2; $(BIN)/python $$b || exit 1; done

lint: $(STAMP)
	$(BIN)/ruff check .

compile-pipeline: $(STAMP)
	$(BIN)/python components/pipeline.py

k8s-check: $(STAMP)
	for o in k8s/overlays/dev k8s/overlays/prod; do kubectl kustomize $$o | $(BIN)/kubernetes-validate -k 1.32 --strict - || exit 1; done

clean:
	rm -rf .mtrec .pytest_cache
