# mmict: `make train` (main job, toy world on CPU by default) and `make test`.
# Both create .venv and install the project on first use.

SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c

VENV ?= .venv
PY := $(VENV)/bin/python
EXP ?= toy_aim
ARGS ?=
CKPT ?=
SHOTS ?=
GRID ?=
DRY_RUN ?=
BENCH ?=
BENCH_ARGS ?=
TEST_WORKERS ?= auto
# Installs are locked: requirements/lock.txt pins every package (torch and its CUDA wheels included) to the
# versions the suite was last green with, as pip constraints. `make upgrade-lock` moves the lock forward
# deliberately. LOCK= (empty) installs the newest versions pyproject.toml allows instead; with it, TORCH_SPEC
# picks another torch build, e.g. make install LOCK= TORCH_SPEC="torch==2.15.0 torchvision==0.29.2".
LOCK ?= requirements/lock.txt
TORCH_SPEC ?=
PIP_INSTALL := $(PY) -m pip install -q --disable-pip-version-check $(if $(LOCK),-c $(LOCK))
PIP_QUIET := 2>&1 | { grep -v -e "is ignored: it is neither a file nor a directory" || true; }
STAMP := $(VENV)/.installed
LOCK_DRIFT := WARNING: $(VENV) differs from $(LOCK) (above), e.g. packages installed by hand; \
	rm -rf $(VENV) && make install gives exactly the locked set

.PHONY: install train eval sweep compare bench test lint upgrade-lock help

help:
	@echo "make train [EXP=toy_aim] [ARGS='key=value ...']   train + evaluate an experiment"
	@echo "make eval CKPT=runs/.../last.ckpt [SHOTS=0,4,8] [ARGS=...]  evaluate a checkpoint"
	@echo "make eval EXP=toy_aim [SHOTS=0,4,8]                evaluate the training-free baselines (no checkpoint)"
	@echo "make sweep EXP=aim_okvqa GRID=\"data.shots=[4,8,16] seed=[1,2,3]\" [DRY_RUN=1] [ARGS='slurm.partition=gpu']"
	@echo "                                                   write a SLURM job array, one task per grid point"
	@echo "make compare RUNS='runs/sweeps/aim_okvqa/<stamp>'   compare runs (or a sweep) offline"
	@echo "make bench [BENCH=latency,floor] [BENCH_ARGS=--quick]  AIM vs vanilla ICL efficiency -> bench/results.json"
	@echo "make test                                          run the test suite"
	@echo "make lint                                          ruff"
	@echo "make upgrade-lock                                  newest versions: lint + tests, rewrite the lock if green"

# pip, setuptools and wheel first (from the lock), then the project without build isolation, so that the
# build backend too is the locked setuptools rather than whatever PyPI serves that day.
$(STAMP): pyproject.toml Makefile $(LOCK)
	@test -x $(PY) || python3 -m venv $(VENV)
	@echo "installing into $(VENV) $(if $(LOCK),with the versions in $(LOCK),unlocked: newest versions) (first time: a few minutes)"
	$(PIP_INSTALL) --upgrade pip setuptools wheel $(PIP_QUIET)
	$(PIP_INSTALL) --no-build-isolation -e ".[dev]" $(TORCH_SPEC) $(PIP_QUIET)
	@$(if $(LOCK),$(PY) -m mmict.dependency_lock check --lock $(LOCK) --quiet || echo "$(LOCK_DRIFT)",true)
	@touch $(STAMP)

install: $(STAMP)

train: $(STAMP)
	$(VENV)/bin/mmict train $(EXP) $(ARGS)

eval: $(STAMP)
	$(VENV)/bin/mmict eval $(if $(CKPT),$(CKPT),--exp $(EXP) eval.demo_modes=[images,text]) \
		$(if $(SHOTS),--shots $(SHOTS)) $(ARGS)

# Each GRID item is quoted for the shell (brackets are glob characters); `key=[a,b]` is an axis, `key=v` fixed.
sweep: $(STAMP)
	$(VENV)/bin/mmict sweep $(EXP) $(foreach g,$(GRID),'$(g)') $(ARGS) $(if $(DRY_RUN),--dry-run)

compare: $(STAMP)
	$(VENV)/bin/mmict compare $(RUNS)

# Benchmarks: latency, floor, lightning, data (default: all); BENCH_ARGS e.g. --quick, --threads 1, --out FILE.
bench: $(STAMP)
	WANDB_MODE=disabled $(PY) -m bench $(if $(BENCH),--only $(BENCH)) $(BENCH_ARGS)

# One pytest-xdist worker per core (TEST_WORKERS=0: one process), each test file on one worker (its module fixtures
# built once); the toy pretraining tests, minutes each, then run side by side.
test: $(STAMP)
	WANDB_MODE=disabled $(if $(LOCK),,MMICT_UNLOCKED=1) $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile $(ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# Re-resolve every dependency to its newest release in a scratch venv, run lint and the suite there, and rewrite
# the lock only if both pass; prints what changed either way (requirements/upgrade-lock.sh).
upgrade-lock:
	bash requirements/upgrade-lock.sh $(LOCK)
