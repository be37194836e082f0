# Two commands on a fresh machine:  make demo  (install, synth, train, serve)  ·  make test
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The CPU build of torch, pinned: an unpinned torch pulls a multi-GB CUDA build.
TORCH  ?= torch==2.13.0
DEMO   ?= runs/demo
ROWS   ?= 200000
PORT   ?= 8000

.PHONY: setup demo train test lint bench-census clean

setup: $(BIN)/.installed

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

# synthetic logs -> train -> per-task metrics and the bundle's path
train: setup
	$(BIN)/ranker synth --out $(DEMO)/logs --rows $(ROWS)
	$(BIN)/ranker train --config $(DEMO)/logs/config.yaml --out $(DEMO)/bundle

# ... then serve the fresh bundle (Ctrl-C stops it)
demo: train
	@echo
	@echo "serving $(DEMO)/bundle on http://127.0.0.1:$(PORT); in another shell try:"
	@echo "  curl -s -X POST 'http://127.0.0.1:$(PORT)/predict?tasks=ctr,cvr' -H 'Content-Type: application/json' -d @examples/predict.json"
	@echo "  curl -s http://127.0.0.1:$(PORT)/metrics | grep ranker_task_"
	@echo
	$(BIN)/ranker serve --bundle $(DEMO)/bundle --port $(PORT)

test: setup
	$(BIN)/python -m pytest

lint: setup
	$(BIN)/ruff check ranker tests bench

bench-census: setup
	$(BIN)/python bench/census.py

clean:
	rm -rf $(DEMO) bench/out
