# Benchmarks: bench/run.py (see docs/BENCHMARKS.md). Installs wrk and webhook from Debian if missing.
#   make bench  benchmark table: ct-appliance vs bare Hypercorn-trio and webhook (BENCH_QUICK=1: short run)
.PHONY: bench

bench: $(STAMP)
	@$(PY) bench/run.py
