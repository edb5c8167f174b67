# mmict: `make train` (main job, toy world on CPU by default) and `make test`.
# Both create .venv and install the project on first use.

SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c

VENV ?= .venv
PY := $(VENV)/bin/python
EXP ?= toy_aim
ARGS ?=
CKPT ?=
# torch and torchvision must come from the registry together (a mismatched pair fails to load
# torchvision's operators). Override for another CUDA build, e.g. TORCH_SPEC="torch==2.15.0 torchvision==0.29.2".
TORCH_SPEC ?= torch==2.15.0 torchvision==0.29.2
PIP_QUIET := 2>&1 | { grep -v -e "is ignored: it is neither a file nor a directory" || true; }
STAMP := $(VENV)/.installed

.PHONY: install train eval test lint clean-runs help

help:
	@echo "make train [EXP=toy_aim] [ARGS='key=value ...']   train + evaluate an experiment"
	@echo "make eval CKPT=runs/.../last.ckpt [ARGS=...]       evaluate a checkpoint"
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
	@test -n "$(CKPT)" || { echo "usage: make eval CKPT=runs/<exp>/<time>/checkpoints/last.ckpt [ARGS=...]"; exit 2; }
	$(VENV)/bin/mmict eval $(CKPT) $(ARGS)

test: $(STAMP)
	WANDB_MODE=disabled $(PY) -m pytest -q $(ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
