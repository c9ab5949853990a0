# RLHF Systems Kit. `make demo` to see it, `make test` to check it.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
RUNS ?= runs
# `make demo INJECT=kl_blowup@20` starts a run with a fault injected, to see alerts fire.
INJECT ?=
# PPO steps of the demo run: ~1500 are a few minutes on a laptop, long enough to watch it live
# (the smoke preset alone, 60 steps, is over in seconds). `make demo STEPS=60` for the short one.
STEPS ?= 1500
# One intra-op thread: on 2-core boxes two threads make small ops ~100x slower, and the
# thread count is part of the determinism settings (results differ bitwise between counts).
export OMP_NUM_THREADS ?= 1

.PHONY: install test bench train_smoke tui demo verify verify_m1 verify_m2 verify_m3 clean

install: $(VENV)/.installed

# Re-install only when the packaging or the torch pin changed.
# constraints.txt pins torch to TORCH_SPEC, so installing the extras (transformers, trl, ...)
# never swaps the torch build; it must say the same as TORCH_SPEC.
$(VENV)/.installed: pyproject.toml Makefile constraints.txt
	@grep -qxF '$(TORCH_SPEC)' constraints.txt || { echo "constraints.txt does not pin $(TORCH_SPEC): edit it"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[train,hf,trl,analysis,gpu,dev]"
	touch $@

test: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m mypy
	$(BIN)/python -m pytest -q tests

# alert_quality.py --quick: false alarms on clean runs and detection delay of injected faults,
# live runs (~6 min; without --quick ~25 min; --fixtures replays the committed logs in seconds).
bench: install
	$(BIN)/python scripts/bench_protocol.py
	@for s in scripts/bench_trainer.py scripts/bench_profiler.py scripts/bench_tui.py scripts/bench_hf.py scripts/bench_distributed.py; do \
	  if [ -f $$s ]; then $(BIN)/python $$s || exit 1; fi; done
	$(BIN)/python scripts/alert_quality.py --quick

train_smoke: install
	$(BIN)/trainerd start --smoke --foreground --runs-dir $(RUNS)

tui: install
	$(BIN)/rlhf-tui $(RUNS)

demo: install
	$(BIN)/trainerd start --smoke --steps $(STEPS) --runs-dir $(RUNS) $(if $(INJECT),--inject $(INJECT))
	$(BIN)/rlhf-tui $(RUNS)

verify: verify_m1 verify_m2 verify_m3

verify_m1: install
	$(BIN)/trainerd verify m1

verify_m2: install
	$(BIN)/trainerd verify m2

verify_m3: install
	$(BIN)/trainerd verify m3

clean:
	rm -rf $(VENV) runs .pytest_cache
