# Quick start:  make app   (set up and start the web app on the shipped models)
#               make test  (set up and run the whole test suite)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PORT   ?= 8501

.PHONY: app test setup setup-dev notebooks benchmark lock clean

# constraints.txt fixes the versions of everything installed, dependencies of dependencies included.
$(BIN)/.runtime: requirements.txt constraints.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip setuptools wheel -c constraints.txt
	$(BIN)/pip install --quiet -r requirements.txt -c constraints.txt
	$(BIN)/pip install --quiet --no-deps -e .   # the `medclassify` command
	touch $@

$(BIN)/.dev: requirements-dev.txt constraints.txt $(BIN)/.runtime
	$(BIN)/pip install --quiet -r requirements-dev.txt -c constraints.txt
	touch $@

setup: $(BIN)/.runtime
setup-dev: $(BIN)/.dev

app: setup
	$(BIN)/streamlit run app.py --server.headless true --server.address 127.0.0.1 --server.port $(PORT)

test: setup-dev
	$(BIN)/python -m pytest

notebooks: setup-dev
	$(BIN)/python scripts/run_notebooks.py

benchmark: setup-dev
	$(BIN)/python benchmarks/benchmark.py --readme

# After changing requirements*.txt: resolve them afresh in a scratch environment and record every version.
lock:
	PYTHON=$(PYTHON) scripts/lock_dependencies.sh

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
