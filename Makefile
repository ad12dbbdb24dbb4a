# diffrl — `make demo` and `make test` do all the set-up on a fresh machine (idempotent).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Where a CUDA torch build comes from on GPU machines; empty = the CPU wheel / whatever pip finds.
TORCH_INDEX_URL ?=
STAMP := $(VENV)/.installed
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
export DS_ACCELERATOR ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo cuda || echo cpu)
export RAY_AUTH_MODE ?= disabled
export TOKENIZERS_PARALLELISM ?= false

.PHONY: venv sysdeps test demo results proto lint pretrain bench clean help

help:
	@echo "make demo   - set up .venv and run the shapes-world demo on the embedded default"
	@echo "make test   - set up .venv and system packages, run the whole test suite"
	@echo "make results - the CRD / ablation / NFT / GRPO runs and report of docs/results.md (~100 min on 2 cores)"
	@echo "make proto  - regenerate proto/*_pb2.py from proto/*.proto"
	@echo "make lint   - ruff"

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -U pip
	# torch first and alone: the pinned CPU wheel here, your CUDA build on GPU machines (kept if present)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0 $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL))
	PIP_CONSTRAINT=$(CURDIR)/constraints.txt $(PY) -m pip install -q -e ".[dev]"
	# the text world's second OCR judge (RapidOCR, its ONNX models inside the wheel). --no-deps: it asks for
	# opencv-python, which would shadow the opencv-python-headless cv2 that the rest of diffrl uses
	PIP_CONSTRAINT=$(CURDIR)/constraints.txt $(PY) -m pip install -q --no-deps rapidocr_onnxruntime pyclipper shapely
	touch $(STAMP)

venv: $(STAMP)

sysdeps:
	@bash scripts/install-system-deps.sh

test: venv sysdeps
	# the tests never reach a model hub (HF_HUB_OFFLINE; tests/conftest.py sets it too); -P: the repo root
	# stays off sys.path (its proto/ is not proto-plus)
	HF_HUB_OFFLINE=$${HF_HUB_OFFLINE:-1} $(PY) -P -m pytest -q

demo: venv sysdeps
	$(VENV)/bin/diffrl demo

results: venv sysdeps
	bash scripts/results.sh

proto: venv
	PY=$(PY) bash scripts/gen-proto.sh

lint: venv
	$(VENV)/bin/ruff check .

pretrain: venv
	$(VENV)/bin/diffrl pretrain

clean:
	rm -rf $(VENV) .cache runs
