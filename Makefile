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
# torch and torchvision must come from the registry together (a mismatched pair fails to load
# torchvision's operators). Override for another CUDA build, e.g. TORCH_SPEC="torch==2.15.0 torchvision==0.29.2".
TORCH_SPEC ?= torch==2.15.0 torchvision==0.29.2
PIP_QUIET := 2>&1 | { grep -v -e "is ignored: it is neither a file nor a directory" || true; }
STAMP := $(VENV)/.installed

.PHONY: install train eval sweep compare bench test lint clean-runs help

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

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || python3 -m venv $(VENV)
	@echo "installing into $(VENV) (first time: a few minutes)"
	$(PY) -m pip install -q --upgrade pip $(PIP_QUIET)
	$(PY) -m pip install -q $(TORCH_SPEC) $(PIP_QUIET)
	$(PY) -m pip install -q -e ".[dev]" $(TORCH_SPEC) $(PIP_QUIET)
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

test: $(STAMP)
	WANDB_MODE=disabled $(PY) -m pytest -q $(ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
