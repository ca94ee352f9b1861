# inbetweener: `make demo` runs the curate job on generated footage, `make test` runs the tests.
SHELL := /bin/bash
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_OUT ?= out/demo
OPENCV_VERSION := 4.12.0.88

export HF_HUB_OFFLINE := 1
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: help install demo test test-fast lint format bench gpu-wheels gpu-rehearsal clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[pipeline,training,dev]'
	# Both OpenCV variants share cv2/: put the headless one back last, on purpose (no libGL needed).
	$(BIN)/pip install -q --force-reinstall --no-deps opencv-python-headless==$(OPENCV_VERSION)
	$(BIN)/python -c "import cv2, av, scenedetect, ray, torch; print('cv2', cv2.__version__, 'torch', torch.__version__)"
	touch $(STAMP)

install: $(STAMP)  ## create .venv with every dependency group

demo: $(STAMP)  ## generate sample footage and curate it with local Ray
	$(BIN)/inbetweener demo --out $(DEMO_OUT)

test: $(STAMP)  ## run the test suite (CPU, offline)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)  ## tests without the slow end-to-end runs
	$(BIN)/python -m pytest -q -m "not slow"

lint: $(STAMP)  ## ruff check and format check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)  ## apply ruff fixes and formatting
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: $(STAMP)  ## curate benchmark: decode vs CPU stages, 1 and 2 workers, peak memory
	$(BIN)/inbetweener bench curate --sources 8 --episodes 3 --width 960 --height 544 --repeat 2

# The GPU machine (bench/gpu_checks.sh) is offline with torch but not open_clip: its wheels travel in
# .whl/ (Python 3.12, x86-64 there), carried with the device call.
gpu-wheels:  ## fetch the wheels bench/gpu_checks.sh installs on the GPU machine into .whl/
	python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
		-d .whl open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.2.13 torchao==0.18.0 tokenizers==0.23.3

gpu-rehearsal:  ## run the GPU checks' CPU paths with the GPU machine's torch (2.11), in .venv-gpu
	bash bench/rehearse_gpu_torch.sh

clean:  ## remove the venv and outputs
	rm -rf $(VENV) out .pytest_cache
