# Two commands do all set-up on a fresh machine (Python >= 3.11, Java 17, make):
#   make demo   create .venv, install, run the pipeline on the bundled sample: curation, then SmolLM2
#               continued pretraining and post-training, each measured before -> after on held-out data
#               (make demo PROFILE=tiny: the fast smoke profile with a tiny from-scratch model)
#   make test   install dev extras, run the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
PROFILE ?= demo
PIP_INSTALL := $(PIP) install --progress-bar off -c constraints.txt

export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DS_ACCELERATOR := cpu

.PHONY: install install-dev demo test test-fast clean ui-check

$(VENV)/.installed: pyproject.toml constraints.txt requirements-nodeps.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --progress-bar off -q -U pip wheel setuptools
	# the CPU torch wheel first, so nothing later can resolve a CUDA build
	$(PIP_INSTALL) torch==2.13.0
	$(PIP_INSTALL) -e '.[dev]'
	# packages whose declared deps would pull CUDA torch / torchvision: installed without deps,
	# their real needs are listed in pyproject.toml or requirements-nodeps.txt
	$(PIP_INSTALL) --no-deps -r requirements-nodeps.txt
	touch $@

install: $(VENV)/.installed
	# the driver JVM's class-data-sharing archive (JVM start-up per stage); a no-op once built
	$(PY) -m infra.spark --build-class-archive

install-dev: install
	# headless-browser tests (lineage explorer, Prefect UI) drive Debian's chromium through chromium-driver
	command -v chromedriver >/dev/null || { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver; } || \
	  echo "chromium-driver not installed: the browser tests will skip"

demo: install
	$(VENV)/bin/refinery demo --config configs/$(PROFILE).yaml

test: install-dev
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q --durations=15 tests; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 0; fi; exit $$rc

test-fast: install-dev
	$(PY) -m pytest -q -m "not slow" tests

clean:
	rm -rf runs .prefect spark-warehouse

# Headless-browser check of the Prefect UI served by `refinery serve` (installs Debian chromium).
ui-check: install-dev
	$(PY) bench/ui_check.py
