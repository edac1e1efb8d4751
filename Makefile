# galpipe: two commands.  `make run` runs the pipeline on the default (offline,
# simulated) config; `make test` runs the test suite.  Both create .venv first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
CORES  ?= 2
# pytest-xdist workers of `make test` (files, not single tests, are spread over them)
TEST_WORKERS ?= 2
STAMP  := $(VENV)/.installed

.PHONY: run test lint report clean-results

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# Reinstalls whenever pyproject.toml changes, so an old .venv picks up raised floors such as
# snakemake>=9.20 (older releases oversubscribe --cores: snakemake/snakemake#3913, see README).
$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet -e '.[test,slurm]'
	@# what the resolver picked (a fresh install may differ from an old .venv)
	@$(BIN)/python -m pip list --format=freeze 2>/dev/null | grep -iE '^(snakemake|snakemake-executor-plugin-slurm|numpy|astropy|astroquery|pandas|pyarrow|galsim)==' | tr '\n' ' '; echo
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/snakemake --cores $(CORES) --configfile config/config.yaml

report: $(STAMP)
	$(BIN)/snakemake --cores $(CORES) --configfile config/config.yaml --report results/report.html

# CI (.ci/run) is `make test`: lint errors (ruff, snakemake --lint) fail it before pytest runs.
test: lint
	bash scripts/test-services.sh
	PATH="$(CURDIR)/$(BIN):$$PATH" GALPIPE_REQUIRE_SLURM=$${CI:+1} $(BIN)/python -m pytest -q -n $(TEST_WORKERS) tests

lint: $(STAMP)
	$(BIN)/ruff check galpipe tests benchmarks workflow/scripts
	$(BIN)/snakemake --lint --configfile config/config.yaml

clean-results:
	rm -rf results logs .snakemake
