# Front door: `make demo` runs the main job on the embedded offline default; `make test` runs the tests.
PYTHON ?= python3
OUT ?= out/demo

.PHONY: install demo test lint

install:
	$(PYTHON) -m pip install --quiet torch==2.13.0
	$(PYTHON) -m pip install --quiet -e '.[test]'

demo: install
	$(PYTHON) demo.py --out $(OUT)

lint:
	$(PYTHON) -m ruff check .

test: install lint
	$(PYTHON) -m pytest -q
