# Benchmarks: bench/run.py (see docs/BENCHMARKS.md). Installs wrk and webhook from Debian if missing.
#   make bench  benchmark table: ct-appliance vs bare Hypercorn-trio and webhook (BENCH_QUICK=1: short run)
.PHONY: bench

bench: $(STAMP)
	@$(PY) bench/run.py

#   make bench-paired  this build's CPU per delivery against bare Hypercorn-trio, both on one core at once
.PHONY: bench-paired
bench-paired: $(STAMP)
	@$(PY) bench/paired.py $(BENCH_PAIRED_ARGS)
