# Two commands on a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION := 2.13.0
STAMP := $(VENV)/.installed

.PHONY: demo test lint configs bench clean

$(PY):
	python3 -m venv $(VENV)

# torch first, pinned: a plain torch requirement could pull a multi-GB CUDA build.
$(STAMP): $(PY) pyproject.toml web/package-lock.json
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==$(TORCH_VERSION)
	$(PY) -m pip install -q -e ".[dev]"
	# The review app's viewer (NiiVue), pinned by web/package-lock.json.
	npm ci --prefix web --no-audit --no-fund --loglevel=error
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/spleen-seg demo --output out/demo

test: $(STAMP)
	$(PY) -m pytest -q tests

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/mypy src

configs: $(STAMP)
	$(PY) -m spleen_seg.training.bundle configs

bench: $(STAMP)
	$(PY) benchmarks/bench_inference.py

clean:
	rm -rf out runs eval models .pytest_cache
