# authmilter — the two commands a new user needs are `make run` and `make test`.
# Both install what they need (Debian packages, then a virtualenv in .venv) first.

PYTHON  ?= python3
VENV    ?= .venv
CONF    ?= etc/authmilter.conf
SUDO    := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# libpq5: psycopg (ReportDatabase postgresql://...) loads the system libpq, never its own.
APT_RUN  = libmilter-dev gcc python3-dev python3-venv libpq5
# Real parts the test suite drives: Postfix, NSD, and the anchors (OpenDKIM, OpenDMARC,
# miltertest, policyd-spf); systemd for `systemd-analyze verify` of the unit; man-db and
# groff-base to check the man pages; postgresql for the private server of the ReportDatabase
# tests (tests/pg_fixture.py runs its own initdb/pg_ctl, never the system cluster).
# rspamd: the ARC peer of tests/test_arc_rspamd.py (tests/rspamd_fixture.py runs its own).
APT_TEST = $(APT_RUN) postfix nsd opendkim opendkim-tools miltertest opendmarc \
           postfix-policyd-spf-python systemd man-db groff-base postgresql rspamd

.PHONY: run test deps-run deps-test venv venv-test lint typecheck check docs clean

EXAMPLE_KEY = keys/example.com/default.private

# The example configuration records DMARC report data in /var/lib/authmilter (made here for
# the user running the milter, when it does not exist yet).
REPORT_DIR = /var/lib/authmilter
run: deps-run venv $(EXAMPLE_KEY)
	@[ -d $(REPORT_DIR) ] || $(SUDO) install -d -o "$$(id -u)" -g "$$(id -g)" -m 0750 $(REPORT_DIR)
	$(VENV)/bin/authmilter run -c $(CONF)

# The example configuration signs example.com with a key made on first run (never committed).
$(EXAMPLE_KEY): | venv
	mkdir -p $(dir $@)
	$(VENV)/bin/authmilter genkey -D $(dir $@) -d example.com -s default

# The Debian package (debian/): build/authmilter_<version>_<arch>.deb, with the Python
# dependencies in a private virtualenv (dh-virtualenv), then lintian on it. The build runs in a
# copy of the tree under build/deb, so the checkout stays clean.
APT_DEB = $(APT_RUN) debhelper dh-virtualenv lintian dpkg-dev rsync
.PHONY: deb deps-deb deploy-test
deb: deps-deb
	rm -rf build/deb && mkdir -p build/deb/authmilter
	rsync -a --exclude=/.git --exclude=/.venv --exclude=/build --exclude='*.egg-info' \
		--exclude=__pycache__ --exclude=.hypothesis --exclude=.pytest_cache \
		--exclude=.mypy_cache --exclude=.ruff_cache --exclude=/keys/*/ ./ build/deb/authmilter/
	cd build/deb/authmilter && dpkg-buildpackage -us -uc -b
	cp build/deb/authmilter_*.deb build/
	lintian --fail-on error,warning --info build/authmilter_*.deb > build/lintian.txt \
		|| { cat build/lintian.txt; exit 1; }
	@echo "lintian: clean, but for the overrides listed with their reasons in debian/authmilter.lintian-overrides"

# The deployment test (tests/test_deploy.py): installs the package, runs it behind the system
# Postfix on loopback, reloads, stops, purges, and puts the machine back as it was.
deploy-test: deb venv-test
	$(VENV)/bin/python -m pytest -q -s tests/test_deploy.py

deps-deb:
	@./.ci/apt-ensure $(APT_DEB)

# Benchmark (bench/README.md): Postfix alone, OpenDKIM, OpenDKIM + OpenDMARC, rspamd and authmilter on
# loopback; about 10 minutes on 2 cores; rewrites the generated section of docs/performance.md.
# `make bench BENCH_ARGS=--quick` is a smoke run (seconds; the document is left alone).
APT_BENCH = $(APT_RUN) postfix nsd opendkim opendmarc rspamd
.PHONY: bench deps-bench

bench: deps-bench venv-test
	AUTHMILTER_BENCH_COMMAND="make bench$(if $(BENCH_ARGS), BENCH_ARGS='$(BENCH_ARGS)')" \
	  $(VENV)/bin/python bench/run.py $(BENCH_ARGS)

deps-bench:
	@./.ci/apt-ensure $(APT_BENCH)

# Load test (docs/load.md): 10,000 mixed messages over 20 connections through Postfix +
# authmilter, every one accounted for, the milter's RSS at start, warm and end; then the milter
# is SIGKILLed mid-run (milter_default_action = tempfail) and nothing may be lost. About 2 min
# on 2 cores; rewrites the generated section of docs/load.md. `make loadtest
# LOADTEST_ARGS=--quick` is a smoke run (seconds; the document is left alone).
.PHONY: loadtest

loadtest: deps-bench venv-test
	AUTHMILTER_LOADTEST_COMMAND="make loadtest$(if $(LOADTEST_ARGS), LOADTEST_ARGS='$(LOADTEST_ARGS)')" \
	  $(VENV)/bin/python loadtest/run.py $(LOADTEST_ARGS)

# Fuzz the whole pipeline (docs/fuzzing.md): mutated messages, envelopes and configurations
# through Connection/Transaction, sign and verify paths, DNS from an in-process zone. Bounded:
# 300 s by default; `make fuzz FUZZ_ARGS="--seconds 60"` or `--max-inputs N`. A failure is
# saved under fuzz/crashes/ (replay with `fuzz/run.py --replay FILE`) and exits non-zero.
.PHONY: fuzz

fuzz: deps-test venv-test
	$(VENV)/bin/python fuzz/run.py $(FUZZ_ARGS)

# Side-by-side run against the real anchors (docs/migration.md): the corpus of compare/corpus.py
# through Postfix with OpenDKIM + OpenDMARC (+ policyd-spf) and with authmilter reading the very
# same files; as root, about 1.5 minutes on 2 cores. Rewrites the generated part of
# docs/migration.md and fails when a difference is not listed in compare/deliberate.py.
# `make compare COMPARE_ARGS=--quick` runs the subset `make test` runs (the document is left alone).
.PHONY: compare

compare: deps-test venv-test
	AUTHMILTER_COMPARE_COMMAND="make compare$(if $(COMPARE_ARGS), COMPARE_ARGS='$(COMPARE_ARGS)')" \
	  $(VENV)/bin/python compare/run.py $(COMPARE_ARGS)

# The RFC 7208 SPF test suite, as pyspf's source distribution ships it (test/), fetched from
# the package registry for tests/test_spf_conformance.py; its checksum is pinned.
PYSPF_VERSION   = 2.0.14
RFC7208_SUITE   = build/conformance/rfc7208-tests.yml
RFC7208_SHA256  = 901f561a6e2b1c1590a40a61b1ac7601226fd7045a7aae591a4d25421358d6f9
.PHONY: conformance
conformance: $(RFC7208_SUITE)

$(RFC7208_SUITE): | venv
	rm -rf build/conformance.tmp && mkdir -p build/conformance.tmp $(dir $@)
	$(VENV)/bin/pip download -q --no-deps --no-binary :all: pyspf==$(PYSPF_VERSION) \
	  -d build/conformance.tmp
	tar -xzf build/conformance.tmp/pyspf-$(PYSPF_VERSION).tar.gz -C build/conformance.tmp \
	  pyspf-$(PYSPF_VERSION)/test/rfc7208-tests.yml
	echo "$(RFC7208_SHA256)  build/conformance.tmp/pyspf-$(PYSPF_VERSION)/test/rfc7208-tests.yml" \
	  | sha256sum -c --quiet
	mv build/conformance.tmp/pyspf-$(PYSPF_VERSION)/test/rfc7208-tests.yml $@
	rm -rf build/conformance.tmp

# Lint and strict typing first (seconds), then the suite with its real Postfix/NSD fixtures.
test: deps-test venv-test lint typecheck $(RFC7208_SUITE) deb
	$(VENV)/bin/python -m pytest -q $(PYTEST_ARGS)

check: venv-test lint typecheck

lint:
	$(VENV)/bin/ruff check milter tests bench loadtest fuzz compare

typecheck:
	$(VENV)/bin/mypy
	MYPYPATH=milter:tests $(VENV)/bin/mypy --strict compare

# Regenerate the directive table of docs/configuration.md and the man pages in man/ (tests
# check they agree with the code).
docs: venv
	$(VENV)/bin/python -m authmilter.config --update docs/configuration.md
	$(VENV)/bin/python -m authmilter.manpages --output-dir man

.PHONY: man
man: docs

# Debian packages: installed only when one is missing, so a warm machine skips apt entirely.
deps-run:
	@./.ci/apt-ensure $(APT_RUN)

deps-test:
	@./.ci/apt-ensure $(APT_TEST)

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(VENV)/bin/pip install -q -e '.[test]'
	touch $@

venv: $(VENV)/.installed
venv-test: $(VENV)/.installed-test

clean:
	rm -rf $(VENV) build *.egg-info milter/*.egg-info .pytest_cache .mypy_cache .ruff_cache
