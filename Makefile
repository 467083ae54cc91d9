# Two commands do all setup on a fresh clone: `make demo` and `make test` (each creates .venv if missing).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch is declared as torch>=2.4,<3 in pyproject; this pin is the build CI tests. PyPI's Linux wheel is the CUDA
# build (about 6 GB installed, with its nvidia-* libraries; it also runs on a CPU). Where the PyTorch CPU index is
# reachable, `make demo TORCH_INDEX=https://download.pytorch.org/whl/cpu` installs the CPU build (under 1 GB).
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
TORCH_INDEX ?=
PIP := pip install -q --disable-pip-version-check
TORCH_INSTALL := $(PIP) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) $(TORCH_SPEC)
STAMP := $(VENV)/.numclip-$(shell cat pyproject.toml | sha1sum | cut -c1-12)
DEMO_CKPT := weights/numclip-tiny-dots.safetensors
LOWEST_VENV ?= .venv-lowest

.PHONY: venv demo test check test-lowest weights clean gpu-check

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/$(TORCH_INSTALL)
	$(BIN)/$(PIP) -e '.[test]'
	rm -f $(VENV)/.numclip-* && touch $@

venv: $(STAMP)

## demo: generate 12 synthetic "count the dots" images and predict them with the shipped demo checkpoint
demo: $(STAMP)
	$(BIN)/numclip synth dots --out demo-out/dots --n 12 --seed 2024 --quiet
	$(BIN)/numclip predict demo-out/dots --recursive --checkpoint $(DEMO_CKPT) --offline --format table

## test: lint, then the whole suite (unit, CLI, subprocess, doctests): what CI runs
test: $(STAMP)
	$(BIN)/ruff check numclip_cli tests
	$(BIN)/pytest

## check: the edit loop: lint, then every test not marked slow (about a minute of CPU)
check: $(STAMP)
	$(BIN)/ruff check numclip_cli tests
	$(BIN)/pytest -q -m "not slow"

## test-lowest: the fast lane in a separate venv with every dependency at the lowest version pyproject declares
## (torch and torchvision stay at TORCH_SPEC: no older build is installable here; test tools stay at their newest)
test-lowest:
	test -x $(LOWEST_VENV)/bin/python || $(PYTHON) -m venv $(LOWEST_VENV)
	$(PYTHON) .ci/lowest_constraints.py --extras face --skip torch,torchvision > $(LOWEST_VENV)/constraints.txt
	$(LOWEST_VENV)/bin/$(TORCH_INSTALL)
	$(LOWEST_VENV)/bin/$(PIP) -c $(LOWEST_VENV)/constraints.txt -e '.[test,face]'
	$(LOWEST_VENV)/bin/pytest -q -m "not slow"
## gpu-check: on a machine with a CUDA GPU, what CPU-only CI cannot run (each precision trains, channels_last
## predict, out-of-memory back-off, nccl DDP with 2+ GPUs, ViT-B-16 predict speed and memory); < 10 minutes
gpu-check: $(STAMP)
	$(BIN)/pytest tests/test_cuda.py -m cuda -rs -v

## weights: re-train the shipped demo checkpoint from scratch (CPU, a few minutes)
weights: $(STAMP)
	$(BIN)/numclip synth dots --out runs/dots-train --n 1500 --seed 0 --quiet
	$(BIN)/numclip train --data runs/dots-train --task runs/dots-train/task.toml --model numclip-tiny \
		--pretrained none --tune-image --tune-context --epochs 12 --milestones 9 --batch-size 32 --lr 3e-3 --image-lr 1e-3 \
		--val-split 0.1 --seed 0 --offline --out $(DEMO_CKPT) --metrics-out weights/numclip-tiny-dots.metrics.json

clean:
	rm -rf $(VENV) $(LOWEST_VENV) demo-out runs .pytest_cache
