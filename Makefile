# The two commands the README starts with:  make run  ·  make test
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
export SAGEMAKER_SUPPRESS_V2_WARNING := 1

.PHONY: run test lint pytest venv browser java sandbox clean benchmark screenshots

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip setuptools wheel

# Reinstall when the project's dependency list changes.
$(STAMP): $(PY) setup.py
	$(PY) -m pip install -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

# Headless Chromium for the report-rendering tests (Debian's package; Playwright's own download is not possible here).
browser:
	@command -v chromium >/dev/null 2>&1 || [ -x /usr/bin/chromium ] || \
	  { if [ "$$(id -u)" = 0 ]; then (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) || echo "warning: could not install chromium; browser tests will be skipped"; \
	    else echo "warning: chromium missing (apt-get install chromium); browser tests will be skipped"; fi; }

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# Java for real TorchServe in the serving-fidelity test (Debian's package; the test is skipped, saying why, without it).
java:
	@command -v java >/dev/null 2>&1 || \
	  { if [ "$$(id -u)" = 0 ]; then (apt-get update -qq && apt-get install -y -qq openjdk-17-jre-headless >/dev/null) || echo "warning: could not install openjdk-17-jre-headless; the TorchServe test will be skipped"; \
	    else echo "warning: java missing (apt-get install openjdk-17-jre-headless); the TorchServe test will be skipped"; fi; }

# bubblewrap, for jobs' private /opt/ml where util-linux unshare is refused (Debian's package; without either, jobs run
# without one, with a warning, and the sandbox tests of the missing mechanism are skipped, saying why).
sandbox:
	@command -v bwrap >/dev/null 2>&1 || \
	  { if [ "$$(id -u)" = 0 ]; then (apt-get update -qq && apt-get install -y -qq bubblewrap >/dev/null) || echo "warning: could not install bubblewrap; its sandbox tests will be skipped"; \
	    else echo "warning: bwrap missing (apt-get install bubblewrap); its sandbox tests will be skipped"; fi; }

# In parallel, one worker per core; each test file stays on one worker (its module fixtures run once) but for the
# long independent ones listed in tests/conftest.py (SPREAD_TESTS_OF). Serially: `make pytest PYTEST_ARGS=`.
PYTEST_ARGS ?= -n auto --dist loadfile
pytest: $(STAMP) browser java sandbox
	$(VENV)/bin/pytest $(PYTEST_ARGS)

test: lint pytest

# The Studio test, writing its page screenshots to docs/ui/ (a plain test run writes them to a temporary folder).
screenshots: $(STAMP) browser
	MLOPS_UI_SCREENSHOTS=docs/ui $(VENV)/bin/pytest -p no:cacheprovider tests/test_ui.py

# Full pipeline locally on a generated dataset, ending with a deployed local endpoint answering a real image.
run: $(STAMP)
	$(PY) -m pipelines.demo

# Sized for a 2-core CPU; run the scripts directly with their defaults (see --help) on a GPU machine.
benchmark: $(STAMP)
	$(PY) benchmarks/bench_dataloading.py --images 120 --epochs 1
	$(PY) benchmarks/bench_training.py --arch resnet18 --image-size 64 --images-per-class 32 --epochs 1 --workers 1 --batch-size 32

clean:
	rm -rf .mlops .pytest_cache .ruff_cache
