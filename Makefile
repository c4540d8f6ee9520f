# The two commands of the README. Both create .venv and install what is missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch is pinned to the release this project is tested with; override for your platform,
# e.g. `make test TORCH_SPEC="torch>=2.4"`, or a CPU-only build (no CUDA libraries):
# `make demo TORCH_SPEC="torch==2.14.1 torchvision==0.29.1 --index-url https://download.pytorch.org/whl/cpu"`.
# Everything else is pinned by constraints.txt.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
# The suite runs in this many processes of one thread each (steady on a busy machine; see tests/conftest.py).
TEST_WORKERS ?= 2

.PHONY: demo test lint clean venv demo-venv

# (Re)installs when pyproject.toml, constraints.txt or TORCH_SPEC changed, when the environment's
# msf is not this checkout's, or when an installed version differs from its pin.
# Each target installs only the extras it needs: the demo the core and TensorBoard, the tests everything.
venv:
	@$(PYTHON) scripts/ensure_venv.py --venv "$(VENV)" --torch "$(TORCH_SPEC)" --extras dev

demo-venv:
	@$(PYTHON) scripts/ensure_venv.py --venv "$(VENV)" --torch "$(TORCH_SPEC)" --extras train

demo: demo-venv
	$(PY) -m msf demo

test: venv
	$(PY) -m pytest -n $(TEST_WORKERS)

lint: venv
	$(PY) -m ruff check .

clean:
	rm -rf runs .pytest_cache .ruff_cache
