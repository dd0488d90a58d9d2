# Two commands on a fresh machine: `make reproduce` (the main job) and `make test`.
# Both create .venv and install what is missing. TORCH names the torch requirement:
# the default is the CPU build; a GPU user installs a CUDA build, e.g.
#   make TORCH="torch==2.13.0 --index-url <the CUDA wheel index from PyTorch's install page>" test
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.ldmground-installed
OUT ?= outputs
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install test test-fast reproduce lint clean

install: $(STAMP)

$(STAMP): pyproject.toml requirements-nodeps.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e ".[test]"
	$(PY) -m pip install --quiet --no-deps -r requirements-nodeps.txt
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check ldmground tests benchmarks

# The main job on the embedded default data (see README for a real model and MS-CXR).
MODEL ?= tiny
DATASET ?= data/phantom/test.csv
IMAGES ?= data/phantom
PRESET ?= fast
reproduce: $(STAMP)
	$(VENV)/bin/ldmground ground --model $(MODEL) --preset $(PRESET) \
		--image data/phantom/images/phantom-test-00005.png --phrase "Right pleural effusion" \
		--out $(OUT)/ground/heatmap.png
	$(VENV)/bin/ldmground evaluate --model centre-prior --dataset $(DATASET) --images $(IMAGES) \
		--preset $(PRESET) --out $(OUT)/centre-prior

clean:
	rm -rf $(OUT) .pytest_cache
