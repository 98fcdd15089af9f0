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
