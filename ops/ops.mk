# ops/: Prometheus rules and Grafana dashboard for CoinTracker's launch window (see ops/README.md).
#   make test-ops   check and unit-test the Prometheus rules and the Grafana dashboard (installs promtool)

.PHONY: test-ops

# promtool comes from Debian's prometheus package. On a host run by systemd the package also
# enables and starts a Prometheus server on :9090; only promtool is wanted here, so it is stopped
# and disabled again (a no-op in containers without systemd).
# promtool checks and unit-tests the rules (the tests also evaluate the dashboard's launch-window
# queries); check_ops.py then does what promtool cannot (see its docstring).
test-ops:
	@command -v promtool >/dev/null || (apt-get update && apt-get install -y --no-install-recommends prometheus \
		&& { systemctl disable --now prometheus >/dev/null 2>&1 || true; })
	promtool check rules ops/prometheus/ct-appliance.rules.yml
	promtool test rules ops/prometheus/ct-appliance.rules.test.yml
	promtool check config ops/prometheus/prometheus.example.yml
	python3 ops/check_ops.py
