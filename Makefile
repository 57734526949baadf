# Two commands on a fresh machine with Python 3.11:
#   make demo   sets up .venv and runs `tributary demo`
#   make test   sets up .venv and runs the whole test suite
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# CPU build of torch; a GPU user installs a CUDA build instead (see README).
TORCH_SPEC ?= torch==2.13.0

.PHONY: demo test browser typecheck bench protos check-protos clean

$(BIN)/tributary: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[torch,dev,edge,ray,report]"
	touch $@

demo: $(BIN)/tributary
	$(BIN)/tributary demo

# the dashboard's browser test drives Debian's chromium; CI runs as root and
# installs it here, and TRIBUTARY_REQUIRE_BROWSER=1 makes a missing one a failure
browser:
	command -v chromium >/dev/null && command -v chromedriver >/dev/null || (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver)

test: $(BIN)/tributary browser
	$(BIN)/mypy
	TRIBUTARY_REQUIRE_BROWSER=1 $(BIN)/python -m pytest -q --durations=10

bench: $(BIN)/tributary
	$(BIN)/python -m bench.throughput
	$(BIN)/python -m bench.secagg
	$(BIN)/python -m bench.durability
	$(BIN)/python -m bench.load
	$(BIN)/python -m bench.observability
	$(BIN)/python -m bench.compression
	$(BIN)/python -m bench.time_to_accuracy

protos: $(BIN)/tributary
	$(BIN)/python scripts/gen_protos.py

check-protos: $(BIN)/tributary
	$(BIN)/python scripts/gen_protos.py --check

clean:
	rm -rf $(VENV) build *.egg-info
