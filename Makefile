# ML3 Bench: one command to reproduce, one to test.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PORT   ?= 5000

export DVC_NO_ANALYTICS := 1
export MLFLOW_DISABLE_TELEMETRY := true
# stages run as `python -m stages.<name>`: make that the project's python
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: install reproduce test benchmark benchmark-pipeline ui clean

$(BIN)/.installed: pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -c requirements.lock -e '.[test]'
	touch $@

install: $(BIN)/.installed

reproduce: install
	dvc repro
	@echo
	@echo "report:       $(CURDIR)/reports/report.html (and report.md)"
	@echo "MLflow store: $(CURDIR)/mlflow.db, artifacts in $(CURDIR)/mlruns"
	@echo "browse it:    make ui   (http://127.0.0.1:$(PORT))"

test: install
	$(BIN)/python -m pytest

# side-by-side timings (ours vs higher, floor, memory) -> benchmarks/results.json
benchmark: install
	$(BIN)/python -m pytest tests/benchmarks --benchmark-enable -p no:warnings \
	  --benchmark-json=benchmarks/results.json

# full and no-op `dvc repro` of the default pipeline -> benchmarks/pipeline.json
benchmark-pipeline: install
	$(BIN)/python benchmarks/time_pipeline.py

# no install step: the store exists only after `make reproduce`
ui:
	@test -x $(BIN)/mlflow || { echo "run 'make reproduce' first"; exit 1; }
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false $(BIN)/mlflow server \
	  --host 127.0.0.1 --port $(PORT) --workers 1 \
	  --backend-store-uri sqlite:///$(CURDIR)/mlflow.db \
	  --default-artifact-root $(CURDIR)/mlruns

clean:
	rm -rf data models results reports metrics mlflow.db mlruns
