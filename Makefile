# Two entry points for a fresh machine with nothing but Python 3.10+:
#   make demo   set up .venv and run the pipeline on the embedded default (synthetic archive)
#   make test   set up .venv and run the test suite (what CI runs)
#   make test-fast   the unit tests only (no training, no Ray jobs): under 2 minutes
#   make test-stream the streamed-training test (Ray Data into Ray Train, both stages): ~2 minutes
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
WORKDIR ?= demo-run
STAMP  := $(VENV)/.installed

.PHONY: demo test test-fast test-stream install clean

# One pip command for everything: s3fs and moto[server] must be resolved together or their
# botocore pins clash. Re-installs only when the project's dependency files change.
$(STAMP): pyproject.toml requirements/constraints.txt requirements/datumaro.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -c requirements/constraints.txt -e '.[dev]'
	test -x $(VENV)/datumaro/bin/python || $(PYTHON) -m venv $(VENV)/datumaro
	$(VENV)/datumaro/bin/python -m pip install -q -r requirements/datumaro.txt
	$(BIN)/python -m cam2seg.doctor
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/cam2seg demo --workdir $(WORKDIR)

test: $(STAMP)
	$(BIN)/python -m pytest tests

test-fast: $(STAMP)
	$(BIN)/python -m pytest tests -m "not slow and not stream" -q

test-stream: $(STAMP)
	$(BIN)/python -m pytest tests -m stream

clean:
	rm -rf $(VENV) $(WORKDIR) .pytest_cache build *.egg-info
