# `make demo` and `make test` set everything up themselves (idempotent); `make setup` does only that.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint clean

setup: $(STAMP) espeak $(BIN)/lmplz

$(STAMP): setup.cfg pyproject.toml
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "Python 3.11 is required ($(PYTHON) not found)"; exit 1; }
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	# pyctcdecode (CTC beam search) pins numpy<2 in its metadata but runs on numpy 2: install it without deps.
	$(BIN)/pip install --quiet --no-deps pyctcdecode==0.5.0
	@touch $(STAMP)

# LM decoding (`evaluate --lm`) and `w2v-dist build-lm`: KenLM has no wheels on PyPI; its sdist holds both the
# Python module and the lmplz/build_binary sources. Boost and zlib come from apt (as root), cmake/g++ too.
KENLM_SDIST := https://files.pythonhosted.org/packages/02/6e/f4e159cef39ea4ef2244b4aa32857d447d60a5d0ee269e1b1f8d3723c03e/kenlm-0.3.0.tar.gz
KENLM_SHA256 := c4628bb9fb63c8a6f9240035b8b037385cfc404cb72e933cf48878291edac1e8
KENLM_DEBS := cmake g++ make zlib1g-dev libbz2-dev liblzma-dev libboost-program-options-dev libboost-system-dev \
	libboost-thread-dev libboost-test-dev
KENLM_BUILD := $(VENV)/kenlm-build

$(BIN)/lmplz: | $(STAMP)
	@dpkg -s $(KENLM_DEBS) >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(KENLM_DEBS) >/dev/null; \
	  else echo "KenLM needs: sudo apt-get install $(KENLM_DEBS)"; exit 1; fi; }
	rm -rf $(KENLM_BUILD) && mkdir -p $(KENLM_BUILD)
	$(BIN)/python -c "import hashlib, urllib.request; data = urllib.request.urlopen('$(KENLM_SDIST)', timeout=300).read(); \
	  assert hashlib.sha256(data).hexdigest() == '$(KENLM_SHA256)', 'kenlm sdist: checksum mismatch'; \
	  open('$(KENLM_BUILD)/kenlm.tar.gz', 'wb').write(data)"
	tar xzf $(KENLM_BUILD)/kenlm.tar.gz -C $(KENLM_BUILD)
	$(BIN)/pip install --quiet $(KENLM_BUILD)/kenlm.tar.gz
	cmake -S $(KENLM_BUILD)/kenlm-0.3.0 -B $(KENLM_BUILD)/tools -DCMAKE_BUILD_TYPE=Release >$(KENLM_BUILD)/cmake.log 2>&1
	cmake --build $(KENLM_BUILD)/tools --target lmplz build_binary -j "$$(nproc)" >$(KENLM_BUILD)/build.log 2>&1
	cp $(KENLM_BUILD)/tools/bin/build_binary $(KENLM_BUILD)/tools/bin/lmplz $(BIN)/

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
	$(BIN)/ruff check w2v_dist benchmarks tests train.py
	$(BIN)/mypy w2v_dist benchmarks

# Only what these targets wrote: `make demo`'s work/demo and the tools' caches. Not work/ as a whole, where
# docs/evaluation.md keeps shards, nor .venv (`make setup` takes minutes; remove it by hand to start over).
clean:
	rm -rf work/demo .pytest_cache .mypy_cache .ruff_cache
