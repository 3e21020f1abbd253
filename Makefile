# Two commands do everything on a fresh clone: `make demo` and `make test`.
# TORCH_SPEC is what gets installed only when the venv has no torch yet; GPU users
# with their own torch keep it (or pass TORCH_SPEC='torch' / point VENV at their env).
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.sde_diffusion-installed

.PHONY: setup demo test test-slow lint format bench clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	@# k-diffusion is a benchmark peer; its sampling module needs only torchsde (its own
	@# requirements would pull torchvision, wandb and clean-fid), so no dependencies are resolved
	$(PY) -m pip install -q --no-deps k-diffusion==0.1.1.post1 torchsde==0.2.6 trampoline==0.1.2
	@touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(PY) -m sde_diffusion demo

test: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest -m "not slow" -q

test-slow: setup
	$(PY) -m pytest -m slow -q

lint: setup
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

bench: setup
	$(PY) benchmarks/solver_overhead.py
	$(PY) benchmarks/train_throughput.py
	$(PY) benchmarks/steps_vs_quality.py

clean:
	rm -rf $(VENV) outputs multirun .pytest_cache .ruff_cache
