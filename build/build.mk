# Release artefacts: the onefile binary, the .deb, the system test on a booted Debian, and the
# unit's security exposure. Included by the main Makefile (VENV, PY, STAMP come from there).
#   make binary          build dist/ct-appliance (PyInstaller onefile, reproducible)
#   make binary-repro    build the committed tree twice from clean: same sha256?
#   make startup-time    median time from exec to /readyz 200 of dist/ct-appliance
#   make deb             build dist/ct-appliance_<version>_amd64.deb with dpkg-deb
#   make test-system     boot Debian bookworm in systemd-nspawn, install the .deb, prove it
#   make security-score  systemd-analyze security of the units; fails above 1.5

BUILD_STAMP   := $(VENV)/.installed-build
APP_VERSION    = $(shell sed -n 's/^__version__ = "\(.*\)"/\1/p' appliance/__init__.py)
DEB            = dist/ct-appliance_$(APP_VERSION)_amd64.deb
# Whole tenths: 15 means an exposure of 1.5 (systemd-analyze's --threshold unit).
SECURITY_MAX  ?= 15

.PHONY: binary binary-repro startup-time deb test-system security-score

$(BUILD_STAMP): $(STAMP) pyproject.toml
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[build]'
	@touch $@

binary: $(BUILD_STAMP)
	@sh build/binary.sh $(PY)

binary-repro: $(BUILD_STAMP)
	@sh build/repro.sh $(PY)

startup-time: binary
	@$(PY) build/startup_time.py dist/ct-appliance 9

deb: binary
	@sh packaging/build-deb.sh $(APP_VERSION) dist/ct-appliance $(DEB)

# Debian bookworm booted under systemd-nspawn (root cached under build/cache/); needs root.
# SIGTERM from timeout makes the test power the container off and delete its root.
test-system: deb
	@CT_SYSTEM_TEST=1 CT_SYSTEM_DEB=$(DEB) timeout -k 60 900 \
		$(VENV)/bin/pytest -p no:cacheprovider -o addopts="" --strict-markers -ra -v \
		tests/system; rc=$$?; cat build/work/system/measurements.txt 2>/dev/null; exit $$rc

security-score:
	@command -v systemd-analyze >/dev/null 2>&1 || { \
		echo "installing Debian's systemd package for systemd-analyze"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq systemd \
		>/dev/null; }
	@out=$$(systemd-analyze security --offline=true --threshold=$(SECURITY_MAX) \
		systemd/ct-appliance.service 2>&1); rc=$$?; echo "$$out" | tail -n 1; exit $$rc
	@out=$$(systemd-analyze security --offline=true --threshold=$(SECURITY_MAX) \
		systemd/ct-appliance-backup.service 2>&1); rc=$$?; echo "$$out" | tail -n 1; exit $$rc
	@# For information: with the opt-in port-443 drop-in appended (later assignments win).
	@mkdir -p build/work/score && cat systemd/ct-appliance.service systemd/port-443.conf \
		> build/work/score/ct-appliance.service
	@systemd-analyze security --offline=true build/work/score/ct-appliance.service 2>&1 \
		| tail -n 1 | sed 's/$$/  (with the opt-in port-443.conf drop-in; not gated)/'
