# Two commands on a fresh machine: `make reproduce` (the main job) and `make test`.
# Both create .venv and install what is missing. TORCH names the torch requirement: the
# default takes PyPI's wheel (the CUDA build on Linux, unless a local CPU wheel is found, as on
# this project's machines); the CPU build elsewhere:
#   make TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu" test
# and a GPU user the CUDA index that matches the driver (PyTorch's install page).
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

# The main job: notebooks 01 -> 05 with papermill. On the embedded default (the demo model,
# the phantom validation split for the sweeps of 01-03, its test split for 04; SPLIT= and
# TEST_SPLIT= name the rows of a CSV's `split` column, empty for every row) the notebooks
# run with their own parameters and are written back in place with their outputs, and the
# figures go to figures/: what is committed. Any other setting writes the executed copies
# and the figures under $(OUT)/ only. For a real model and MS-CXR (see README):
#   make reproduce MODEL=models/cxr-ldm PRESET=paper DEVICE=cuda LIMIT=1200 OUT=outputs/mscxr \
#        DATASET=/data/MS_CXR_Local_Alignment_v1.1.0.csv IMAGES=/data/mimic-cxr-jpg
MODEL ?= demo
DATASET ?= data/phantom/test.csv
IMAGES ?= data/phantom
SWEEP_DATASET ?= $(if $(filter data/phantom/test.csv,$(DATASET)),data/phantom/val.csv,$(DATASET))
SPLIT ?= val
TEST_SPLIT ?= test
N_SAMPLES ?= 80
PRESET ?=
STEPS ?=
LIMIT ?=
DEVICE ?=
NOTEBOOKS := 01_feature_selection 02_aggregation 03_postprocessing 04_mscxr_evaluation
EMBEDDED := $(and $(filter demo,$(MODEL)),$(filter data/phantom/test.csv,$(DATASET)),$(filter data/phantom,$(IMAGES)),$(filter data/phantom/val.csv,$(SWEEP_DATASET)),$(filter val,$(SPLIT)),$(filter 80,$(N_SAMPLES)),$(if $(PRESET)$(STEPS)$(LIMIT)$(DEVICE),,yes))
# a model given as a folder is made absolute (papermill runs in notebooks/); a name stays a name
MODEL_ARG := $(if $(wildcard $(MODEL)),$(abspath $(MODEL)),$(MODEL))
PARAMS = -p model $(MODEL_ARG) -p images $(abspath $(IMAGES)) -p out_dir $(abspath $(OUT))/$$nb \
	-p figures_dir $(abspath $(OUT))/figures \
	$(if $(PRESET),-p preset $(PRESET)) $(if $(STEPS),-p steps $(STEPS)) $(if $(DEVICE),-p device $(DEVICE))
reproduce: $(STAMP)
ifeq ($(EMBEDDED),yes)
	set -e; for nb in $(NOTEBOOKS) 05_figures; do \
	  $(VENV)/bin/papermill --cwd notebooks notebooks/$$nb.ipynb notebooks/$$nb.ipynb; \
	done
	@echo "figures in figures/, tables in outputs/, executed notebooks in notebooks/"
else
	mkdir -p $(OUT)/notebooks
	set -e; for nb in $(NOTEBOOKS); do \
	  if [ $$nb = 04_mscxr_evaluation ]; then extra="-p dataset $(abspath $(DATASET)) $(if $(TEST_SPLIT),-p split $(TEST_SPLIT),-p split None) $(if $(LIMIT),-p limit $(LIMIT))"; \
	  else extra="-p dataset $(abspath $(SWEEP_DATASET)) $(if $(SPLIT),-p split $(SPLIT),-p split None) -p n_samples $(N_SAMPLES) -p cache_dir $(abspath $(OUT))/cache"; fi; \
	  $(VENV)/bin/papermill --cwd notebooks notebooks/$$nb.ipynb $(OUT)/notebooks/$$nb.ipynb $(PARAMS) $$extra; \
	done
	$(VENV)/bin/papermill --cwd notebooks notebooks/05_figures.ipynb $(OUT)/notebooks/05_figures.ipynb \
	  -p results_dir $(abspath $(OUT)) -p figures_dir $(abspath $(OUT))/figures
	@echo "figures in $(OUT)/figures/, tables in $(OUT)/, executed notebooks in $(OUT)/notebooks/"
endif

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
