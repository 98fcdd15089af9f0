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
