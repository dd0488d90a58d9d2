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

.PHONY: install test test-fast reproduce explorer lint clean

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

# The main job: notebooks 01 -> 05 with papermill on the embedded default (the demo model on
# the phantom split). Executed copies and result tables go to $(OUT)/, figures to figures/.
# For a real model and MS-CXR (see README):
#   make reproduce MODEL=models/cxr-ldm DATASET=.../MS_CXR_Local_Alignment_v1.1.0.csv \
#        IMAGES=/data/mimic-cxr-jpg PRESET=paper LIMIT=1200
MODEL ?= demo
DATASET ?= data/phantom/test.csv
IMAGES ?= data/phantom
PRESET ?= demo
STEPS ?= null
LIMIT ?= 200
DEVICE ?=
FIGURES ?= figures
NOTEBOOKS := 01_feature_selection 02_aggregation 03_postprocessing 04_mscxr_evaluation
reproduce: $(STAMP)
	mkdir -p $(OUT)/notebooks
	set -e; for nb in $(NOTEBOOKS); do \
	  $(VENV)/bin/papermill --cwd notebooks notebooks/$$nb.ipynb $(OUT)/notebooks/$$nb.ipynb \
	    -p model $(MODEL) -p dataset $(abspath $(DATASET)) -p images $(abspath $(IMAGES)) \
	    -p preset $(PRESET) -y "steps: $(STEPS)" -p out_dir $(abspath $(OUT))/$$nb -p figures_dir $(abspath $(FIGURES)) \
	    $(if $(DEVICE),-p device $(DEVICE)) $$( [ $$nb = 04_mscxr_evaluation ] && echo "-p limit $(LIMIT)" ); \
	done
	$(VENV)/bin/papermill --cwd notebooks notebooks/05_figures.ipynb $(OUT)/notebooks/05_figures.ipynb \
	  -p results_dir $(abspath $(OUT)) -p figures_dir $(abspath $(FIGURES))
	@echo "figures in $(FIGURES)/, tables in $(OUT)/04_mscxr_evaluation/"

# The explorer (notebook 06) in JupyterLab, opened from a fresh copy $(OUT)/06_explorer.ipynb
# with the data paths made absolute (papermill --prepare-only runs nothing): JupyterLab's
# autosave writes the widgets' outputs into the copy, never into the tracked notebook.
explorer: $(STAMP)
	mkdir -p $(OUT)
	$(VENV)/bin/papermill --prepare-only notebooks/06_explorer.ipynb $(OUT)/06_explorer.ipynb \
	  -p model $(MODEL) -p dataset $(abspath $(DATASET)) -p images $(abspath $(IMAGES)) -p preset $(PRESET) \
	  $(if $(DEVICE),-p device $(DEVICE))
	$(VENV)/bin/jupyter lab $(OUT)/06_explorer.ipynb

clean:
	rm -rf $(OUT) .pytest_cache
