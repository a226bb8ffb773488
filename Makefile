# pg_llm — GPT-2 in PostgreSQL. `make setup` then `make test`.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
PG_CONFIG ?= /usr/lib/postgresql/15/bin/pg_config
EXTDIR = $(shell $(PG_CONFIG) --sharedir)/extension
PYTEST_ARGS ?=

.PHONY: setup generate check-generated install test test-slow lint bench db db-stop clean help

help:  ## list targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*##/\t/'

setup:  ## install PostgreSQL 15 + plpython3u, fast numpy for the server, .venv, tokenizer files (idempotent)
	bash scripts/setup.sh
	@if [ "$$(id -u)" = 0 ] || sudo -n true 2>/dev/null; then $(MAKE) --no-print-directory install; fi

generate:  ## regenerate sql/**, install.sql and the extension script from py/
	$(PY) -m pg_llm.gen.build

check-generated:  ## fail when committed SQL differs from the generator's output
	$(PY) -m pg_llm.gen.build --check

install:  ## install the (committed, generated) extension files so CREATE EXTENSION pg_llm works
	@if [ -w "$(EXTDIR)" ]; then SUDO=; else SUDO=sudo; fi; \
	$$SUDO install -m 644 pg_llm.control pg_llm--0.1.0.sql "$(EXTDIR)/" && echo "installed pg_llm into $(EXTDIR)"

test:  ## the whole default suite on an ephemeral PostgreSQL (tiny configs)
	@if [ "$$(id -u)" = 0 ] || sudo -n true 2>/dev/null; then $(MAKE) --no-print-directory install >/dev/null; fi
	$(VENV)/bin/ruff check py tests
	$(VENV)/bin/pytest $(PYTEST_ARGS)

test-slow:  ## GPT-2 small sizes
	$(VENV)/bin/pytest -m slow $(PYTEST_ARGS)

lint:
	$(VENV)/bin/ruff check py tests

bench:  ## kernels, COPY, tokenizer, model: pg_llm vs numpy/torch in one run
	$(PY) -m pg_llm.bench

db:  ## start the dev cluster under .pg_llm/ (database pg_llm)
	$(VENV)/bin/pg-llm db start

db-stop:  ## stop the dev cluster
	$(VENV)/bin/pg-llm db stop

clean:
	rm -rf .pytest_cache .ruff_cache build *.egg-info
