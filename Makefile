# The two commands of the README: `make demo` and `make test`. Both set the
# machine up first (scripts/bootstrap.sh is idempotent and quick when done).
PY := .venv/bin/python

.PHONY: bootstrap demo test bench clean

bootstrap:
	scripts/bootstrap.sh

demo: bootstrap
	$(PY) -m patronus.cli demo

test: bootstrap
	$(PY) -m pytest -q

bench: bootstrap
	$(PY) -m pytest benchmarks -q --benchmark-only --benchmark-columns=min,median,mean,ops,rounds

clean:
	rm -rf build .venv *.egg-info patronus/*.so patronus/_fast.c .pytest_cache .hypothesis

# `make fuzz`: only tests/adversarial/test_sanitizers.py (the C data plane,
# tests/c/dataplane_fuzz.c, built with -fsanitize=address,undefined and fed
# generated rules, site prefixes and frames), with FUZZ_EXAMPLES examples
# instead of the 150 of `make test` (PATRONUS_FUZZ_EXAMPLES), LeakSanitizer
# on (PATRONUS_FUZZ_LEAKS) and no per-test timeout. FUZZ_EXAMPLES=20000 make fuzz
# for a longer run; a failure prints the input as hex and the failing check.
.PHONY: fuzz
FUZZ_EXAMPLES ?= 3000
fuzz: bootstrap
	PATRONUS_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) PATRONUS_FUZZ_LEAKS=1 \
		$(PY) -m pytest -q --timeout=0 tests/adversarial/test_sanitizers.py

# `make bench-peers`: patronus against the programs a user would pick instead
# (issue 24), one table at the end: XDP against plain eBPF flow trackers
# (benchmarks/test_bench_peers_xdp.py), pcap to flows against nfpcapd and
# tshark (test_bench_peers_pcap.py), the cached classifier against its memory
# bound (test_bench_peers_classify.py). Root; installs the peers first
# (scripts/bootstrap.sh --bench-peers, not part of `make test`). Results are
# JSON lines in $(PEERS_OUT); `benchmarks/peers_report.py --markdown` prints
# the table for docs/PERFORMANCE.md. pytest-benchmark's own tables are off
# (--benchmark-disable: each test wraps its interleaved runs in one round).
.PHONY: bench-peers
PEERS_OUT ?= .bench-peers/results.jsonl
bench-peers: bootstrap
	scripts/bootstrap.sh --bench-peers
	rm -f $(PEERS_OUT)
	PATRONUS_PEERS_OUT=$(PEERS_OUT) $(PY) -m pytest benchmarks/test_bench_peers_*.py -q -p no:cacheprovider \
		--benchmark-disable --benchmark-disable-gc --timeout=900 -o addopts=
	PATRONUS_PEERS_OUT=$(PEERS_OUT) $(PY) benchmarks/peers_report.py $(PEERS_OUT)
