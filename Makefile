# The two commands that matter: `make demo` and `make test` (see README).
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# This machine's pip config lists index mirrors that may be absent; hide that noise.
QUIET_PIP := 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }

.PHONY: install browser demo test up down status clean-state

install: $(STAMP)

# torch first: `torch==2.13.0` resolves to the CPU wheel on disk; anything that
# pulled torch in as a dependency first would download GBs of CUDA wheels.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check torch==2.13.0 $(QUIET_PIP)
	$(BIN)/pip install -q --disable-pip-version-check -c constraints.txt -e '.[dev]' $(QUIET_PIP)
	touch $(STAMP)

demo: install
	$(BIN)/aligndiff demo

# The UI test drives Debian's Chromium (Playwright would download its own build otherwise).
browser:
	@test -x /usr/bin/chromium || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } \
	  || { echo "make browser: could not install Debian's chromium (needs root: apt-get install chromium)" >&2; exit 1; }

test: install browser
	$(BIN)/pytest

up down status: install
	$(BIN)/aligndiff $@
