# The two commands a new user needs: `make serve` and `make test`. Both install what they need first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install serve test bench mutate clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $@

install: $(BIN)/.installed

serve: install
	$(BIN)/groq-proxy serve $(ARGS)

test: install
	$(BIN)/pytest $(ARGS)

bench: install
	@command -v wrk >/dev/null || (apt-get update -qq && apt-get install -y -qq wrk)
	$(BIN)/python -m bench.run $(ARGS)

# Mutation testing (mutmut), outside `make test` and CI: slow, one module at a time with `MODULE=sse`; see
# mutate/README.md. MUTANTS='*[05]' runs about a fifth of each module's mutants.
MUTATE_MODULES := cooldown sse config http1 pipeline
MODULE ?= $(MUTATE_MODULES)
MUTATE_JOBS ?= 2

$(BIN)/.mutate-installed: $(BIN)/.installed
	$(BIN)/pip install -q -e '.[test,mutate]'
	touch $@

mutate: $(BIN)/.mutate-installed
	MUTMUT=$(abspath $(BIN))/mutmut JOBS=$(MUTATE_JOBS) MUTANTS="$(MUTANTS)" sh mutate/run.sh $(MODULE)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mutate
