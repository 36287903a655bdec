# Two entry points for a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
# torch and torchvision pinned as a pair: the Qwen2-VL processor needs torchvision, and
# PyPI's torchvision imports only beside the torch it was built for. (This build also
# runs on CPU; where torch and torchvision are already installed, they are kept.)
TORCH_PINS := torch==2.14.1 torchvision==0.29.1

.PHONY: install demo test clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch, torchvision" 2>/dev/null || $(PY) -m pip install -q $(TORCH_PINS)
	$(PY) -m pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) tools/demo.py

test: install
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV)
