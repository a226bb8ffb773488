# pg_llm — GPT-2 in PostgreSQL. `make setup` then `make test`.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

# PGXS (Debian ships it in postgresql-client-15): `make install` copies pg_llm.control and the built
# extension script into PostgreSQL's share directory, so that CREATE EXTENSION pg_llm works.
EXTENSION = pg_llm
DATA_built = pg_llm--0.1.0.sql
EXTRA_CLEAN = install.sql .pytest_cache .ruff_cache build *.egg-info
# installcheck is ours (below): it starts its own server
NO_INSTALLCHECK = 1
PG_CONFIG ?= /usr/lib/postgresql/15/bin/pg_config
PGXS := $(shell $(PG_CONFIG) --pgxs)
include $(PGXS)
.DEFAULT_GOAL := help

# The install scripts are build outputs: the committed sql/** files (generated from py/) concatenated.
GEN_SOURCES := $(shell find py -name '*.py' -not -path '*/__pycache__/*')
pg_llm--0.1.0.sql install.sql &: $(GEN_SOURCES)
	$(PY) -m pg_llm.gen.build

# Install as root (or through sudo) but build as the caller, so the checkout keeps its owner.
SUDO_INSTALL = if [ -w "$(DESTDIR)$(datadir)/extension" ]; then $(MAKE) --no-print-directory install; \
	elif sudo -n true 2>/dev/null; then sudo -n $(MAKE) --no-print-directory install; \
	else echo "make install: not root and no sudo: CREATE EXTENSION pg_llm needs it (psql -f install.sql does not)"; fi

.PHONY: help setup generate check-generated test test-slow installcheck lint bench db db-stop

help:  ## list targets
	@grep -E '^[a-z-]+:.*##' $(firstword $(MAKEFILE_LIST)) | sed 's/:.*##/\t/'

setup:  ## install PostgreSQL 15 + plpython3u, fast numpy for the server, .venv, tokenizer files (idempotent)
	bash scripts/setup.sh
	$(MAKE) --no-print-directory generate
	@$(SUDO_INSTALL)

generate:  ## regenerate sql/** from py/ and build install.sql and the extension script
	$(PY) -m pg_llm.gen.build

install:  ## (PGXS) copy pg_llm.control and the extension script into PostgreSQL, for CREATE EXTENSION pg_llm

check-generated:  ## fail when committed SQL (sql/**) differs from the generator's output
	$(PY) -m pg_llm.gen.build --check

test: generate  ## the whole default suite on an ephemeral PostgreSQL (tiny configs), pg_regress included
	@$(SUDO_INSTALL) >/dev/null
	$(VENV)/bin/ruff check py tests
	$(VENV)/bin/pytest $(PYTEST_ARGS)

installcheck: generate  ## pg_regress: test/sql vs test/expected on CREATE EXTENSION pg_llm (seconds, no torch)
	@$(SUDO_INSTALL) >/dev/null
	$(PY) -m pg_llm.harness.regress

test-slow: generate  ## GPT-2 small sizes
	$(VENV)/bin/pytest -m slow $(PYTEST_ARGS)

lint:
	$(VENV)/bin/ruff check py tests

bench: generate  ## kernels, COPY, tokenizer, model: pg_llm vs numpy/torch in one run
	$(PY) -m pg_llm.bench

db: generate  ## start the dev cluster under .pg_llm/ (database pg_llm)
	$(VENV)/bin/pg-llm db start

db-stop:  ## stop the dev cluster
	$(VENV)/bin/pg-llm db stop
