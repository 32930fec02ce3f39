# cldlr — two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PYTEST := $(BIN)/python -m pytest

.PHONY: install deploy-deps browser-deps lint demo test test-slow test-all bench clean

# The venv is (re)built whenever pyproject.toml changes; everything the tests and demo need is
# installed here, so a clean checkout needs nothing but Python 3.11.
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip setuptools wheel
	$(BIN)/python -m pip install --quiet -e ".[test]"
	@touch $(STAMP)

install: $(STAMP)

# What a deployment needs besides Python: nginx, the centre's Fleet-only reverse proxy (`cldlr deploy
# proxy`), from the distribution's packages. Only the slow (deployed) tests need it; installed here
# only when it is missing and we may (root with apt-get). The tests start their own nginx processes;
# nothing here starts or enables nginx's system service (a package install on systemd may start it).
NGINX := $(shell command -v nginx 2>/dev/null || { test -x /usr/sbin/nginx && echo /usr/sbin/nginx; })
deploy-deps:
ifeq ($(NGINX),)
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nginx; \
	else \
		echo "nginx is missing: install it (e.g. sudo apt-get install nginx); the proxy tests skip without it"; \
	fi
else
	@echo "nginx: $(NGINX)"
endif

# The reading app's browser test (tests/test_reader_app_browser.py) drives headless Chromium through
# chromedriver; both come from the distribution's packages, installed when missing and we may (root with
# apt-get), else the test skips and says why.
CHROMIUM := $(shell command -v chromium 2>/dev/null)
CHROMEDRIVER := $(shell command -v chromedriver 2>/dev/null)
browser-deps:
ifneq ($(and $(CHROMIUM),$(CHROMEDRIVER)),)
	@echo "chromium: $(CHROMIUM), chromedriver: $(CHROMEDRIVER)"
else
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium chromium-driver; \
	else \
		echo "chromium/chromedriver missing: install them (e.g. sudo apt-get install chromium chromium-driver); the browser test skips without them"; \
	fi
endif

demo: $(STAMP)
	$(BIN)/python -m cldlr.simulations.demo --out demo-out

# ruff over the whole tree; mypy --strict over cldlr.common and cldlr.server. mypy cannot follow the
# editable install's folder mapping (common/ -> cldlr.common), so it reads a tree of symlinks that
# has the installed package's shape.
TYPED := $(VENV)/typed
lint: $(STAMP)
	$(BIN)/ruff check --quiet .
	@rm -rf $(TYPED) && mkdir -p $(TYPED)/cldlr
	@for f in cldlr/*.py; do ln -s "$(CURDIR)/$$f" $(TYPED)/cldlr/; done
	@for d in common client server simulations; do ln -s "$(CURDIR)/$$d" $(TYPED)/cldlr/$$d; done
	cd $(TYPED) && $(abspath $(BIN))/mypy --config-file $(CURDIR)/pyproject.toml -p cldlr.common -p cldlr.server

test: lint browser-deps
	$(PYTEST) -q

test-slow: $(STAMP) deploy-deps
	$(PYTEST) -q -m slow

test-all: $(STAMP) deploy-deps
	$(PYTEST) -q -m "slow or not slow"

bench: $(STAMP)
	$(BIN)/python bench/run.py

clean:
	rm -rf $(VENV) runs demo-out .cache .pytest_cache
