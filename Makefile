# `make demo`: set up .venv and run the main job. `make test`: set up .venv and run the suite.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test setup clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --no-compile -c constraints.txt -e ".[all,test]"
	@# Byte-compiled here on every core (pip compiles on one). Files only a newer Python parses stay
	@# uncompiled, as pip leaves them (compileall then exits 1).
	$(PY) -m compileall -qq -j 0 $(VENV)/lib || true
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/danet-parity

test: $(STAMP)
	$(PY) -m parity_tests.run_suite

clean:
	rm -rf $(VENV) build *.egg-info
