# `make demo` and `make test` set everything up themselves (idempotent); `make setup` does only that.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint clean

setup: $(STAMP) espeak

$(STAMP): setup.cfg pyproject.toml
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "Python 3.11 is required ($(PYTHON) not found)"; exit 1; }
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	# pyctcdecode (CTC beam search) pins numpy<2 in its metadata but runs on numpy 2: install it without deps.
	$(BIN)/pip install --quiet --no-deps pyctcdecode==0.5.0
	@touch $(STAMP)

.PHONY: espeak
espeak:
	@command -v espeak-ng >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq espeak-ng >/dev/null; \
	  else echo "espeak-ng is missing: run 'sudo apt-get install espeak-ng' and retry"; exit 1; fi; }

demo: setup
	$(BIN)/w2v-dist demo --config configs/demo.yaml

# pytest exits 5 when it collected no test: that is a failure here, like any other non-zero code.
test: setup
	$(BIN)/python -m pytest; code=$$?; \
	  if [ $$code -eq 5 ]; then echo "pytest collected no tests"; fi; exit $$code

lint: setup
	$(BIN)/ruff check w2v_dist tests train.py
	$(BIN)/mypy w2v_dist

clean:
	rm -rf work/ .pytest_cache
