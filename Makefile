# Front door: `make demo` runs the main job on the embedded offline default; `make test` runs the tests.
PYTHON ?= python3
OUT ?= out/demo

.PHONY: install system-deps demo test lint
# apt as root, or through sudo otherwise; no prompts.
APT_GET := $(if $(filter 0,$(shell id -u)),,sudo) env DEBIAN_FRONTEND=noninteractive apt-get -y -qq

install:
	$(PYTHON) -m pip install --quiet torch==2.13.0
	$(PYTHON) -m pip install --quiet -e '.[test]'

# System packages the tests need: Debian's prometheus (tests/test_head_node.py scrapes a run with a real one).
# Nothing to do once it is on PATH; apt's chatter is shown only if the install fails. A fresh container has no
# package lists yet, hence the `apt-get update` on the second try.
system-deps:
	@command -v prometheus >/dev/null 2>&1 || { \
	  log=$$(mktemp); \
	  { $(APT_GET) install --no-install-recommends prometheus || \
	    { $(APT_GET) update && $(APT_GET) install --no-install-recommends prometheus; }; } >$$log 2>&1 </dev/null \
	    || { cat $$log; rm -f $$log; exit 1; }; \
	  rm -f $$log; echo "installed prometheus (Debian package) for the tests"; }

demo: install
	$(PYTHON) demo.py --out $(OUT)

lint:
	$(PYTHON) -m ruff check .

# Two pytest workers, a test file each at a time (its module fixtures built once; tests/conftest.py makes the
# groups); the slowest tests' durations close the output, so a slow test is seen when it lands.
test: install system-deps lint
	$(PYTHON) -m pytest -q -n 2 --dist loadgroup --durations=20
