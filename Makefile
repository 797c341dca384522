# Two commands: `make demo` (train both stages on bundled data, write sample grids) and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_PIN := torch==2.14.1 torchvision==0.29.1

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_PIN)
	$(BIN)/pip install -q -e '.[test]'
	touch $@

install: $(BIN)/.installed

demo: $(BIN)/.installed
	$(BIN)/python scripts/demo.py

test: $(BIN)/.installed
	$(BIN)/python -m pytest -q tests

golden: $(BIN)/.installed
	$(BIN)/python ../shared/reference/golden_runner.py

.PHONY: install demo test golden
