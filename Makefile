# Two commands do all setup on a fresh clone: `make demo` and `make test` (each creates .venv if missing).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch is declared as torch>=2.4 in pyproject; this pin is the build known to work on our machines
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.numclip-$(shell cat pyproject.toml | sha1sum | cut -c1-12)
DEMO_CKPT := weights/numclip-tiny-dots.safetensors

.PHONY: venv demo test lint weights clean gpu-check

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check $(TORCH_SPEC)
	$(BIN)/pip install -q --disable-pip-version-check -e '.[test]'
	rm -f $(VENV)/.numclip-* && touch $@

venv: $(STAMP)

## demo: generate 12 synthetic "count the dots" images and predict them with the shipped demo checkpoint
demo: $(STAMP)
	$(BIN)/numclip synth dots --out demo-out/dots --n 12 --seed 2024 --quiet
	$(BIN)/numclip predict demo-out/dots --recursive --checkpoint $(DEMO_CKPT) --offline --format table

## test: lint, then the whole suite (unit, CLI, subprocess, doctests)
test: $(STAMP)
	$(BIN)/ruff check numclip_cli tests
	$(BIN)/pytest

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
	rm -rf $(VENV) demo-out runs .pytest_cache
