# ct-appliance developer entry points. Everything a target needs is installed by the target.
#   make run    start the appliance on a generated dev config (./var/dev-config.yaml)
#   make test   lint, type-check and run every test
#   make deps   install the Debian packages the end-to-end tests drive (openssl, chromium, prometheus, postgresql, haproxy)
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: run test lint typecheck unit clean lock deps
# Debian packages the end-to-end tests drive for real (installed once; skipped when present).
DEB_TEST_PKGS := openssl chromium prometheus postgresql haproxy

.DEFAULT_GOAL := help

help:
	@sed -n 's/^#   //p' Makefile build/*.mk ops/*.mk bench/*.mk 2>/dev/null

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev]'
	@touch $@

venv: $(STAMP)

run: $(STAMP)
	@$(PY) -m appliance.devsetup

lint: $(STAMP)
	$(VENV)/bin/ruff check appliance tests examples bench ops build
	$(VENV)/bin/ruff format --check appliance tests examples bench ops build

typecheck: $(STAMP)
	$(VENV)/bin/mypy

unit: $(STAMP)
	$(VENV)/bin/pytest -q

test: lint typecheck unit

# The tests run their own PostgreSQL clusters and haproxy processes: the "main" cluster on 5432
# and the haproxy service that the packages create (and may start from their init scripts when
# there is no systemd) are stopped and disabled; failures are ignored.
deps:
	@missing=$$(for p in $(DEB_TEST_PKGS); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null \
		| grep -q '^install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages: $$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
			--no-install-recommends $$missing >/dev/null; \
		systemctl disable --now prometheus >/dev/null 2>&1 || true; \
		systemctl disable --now postgresql haproxy >/dev/null 2>&1 || true; \
		pg_lsclusters -h 2>/dev/null | awk '$$4 == "online" {print $$1, $$2}' | \
			while read -r ver name; do pg_ctlcluster "$$ver" "$$name" stop >/dev/null 2>&1; done; \
		service haproxy stop >/dev/null 2>&1 || true; \
	fi

# Regenerate the lock of transitive versions from the pins in pyproject.toml.
lock:
	rm -rf /tmp/ct-lock && $(PYTHON) -m venv /tmp/ct-lock
	/tmp/ct-lock/bin/pip install --quiet -e '.[dev,build]'
	/tmp/ct-lock/bin/pip freeze --exclude-editable | grep -v '^-e' > constraints.txt

clean:
	rm -rf $(VENV) dist build/work var .mypy_cache .ruff_cache .pytest_cache

-include build/build.mk ops/ops.mk bench/bench.mk
