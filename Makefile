# Two entry points for a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
# A CPU build of torch; pinned because an unpinned torch pulls a multi-GB CUDA build.
CPU_TORCH := torch==2.13.0

.PHONY: install demo test clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(CPU_TORCH)
	$(PY) -m pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) tools/demo.py

test: install
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV)
