# kv-distill. Everything heavy (venv, cargo target dir, models, data) lives in
# $(KVD_CACHE), outside the clone, so a second run is fast and a fresh machine
# still works from scratch.
SHELL := /bin/bash
KVD_CACHE ?= $(HOME)/.cache/kv-distill
VENV := $(KVD_CACHE)/venv
CARGO_TARGET_DIR ?= $(KVD_CACHE)/target
export KVD_CACHE CARGO_TARGET_DIR
export PATH := $(VENV)/bin:$(PATH)
export LIBTORCH_USE_PYTORCH := 1
export KVD_PYTHON := $(VENV)/bin/python
BIN := $(CARGO_TARGET_DIR)/release
SMOLLM2 := $(KVD_CACHE)/assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
# SQuAD v1.1 dev from the BIG-bench package, or where the registry no longer
# serves it, the substitute setup makes from the essays (scripts/fetch_assets.sh);
# expanded when a recipe runs, after setup.
SQUAD_DEV = $(firstword $(wildcard $(KVD_CACHE)/assets/bigbench/squad_shifts/squaddev_v1.1.json) \
	$(KVD_CACHE)/assets/qa-substitute/squad_shifts/squaddev_v1.1.json)
DATA ?= $(KVD_CACHE)/data
RESULTS ?= results
STEPS ?= 10
QUESTIONS ?= 8

.PHONY: setup build run test lint fmt bench-gpu device-bundle

## setup: venv with torch 2.11.0 + oracles, real models and data (idempotent)
setup:
	@scripts/setup.sh

## build: the release binaries (kv-distill, kvd-data, coordinator)
build: setup
	cargo build --release -p kvd-trainer -p kvd-data -p kvd-coordinator --bins

## run: the embedded default job on this machine (GPU if there is one): prepare
## the real training data as Parquet in file://$(DATA), then a distributed
## KV-Distill job for SmolLM2-135M-Instruct: `coordinator --workers 2
## --spawn-local` with two local workers (one GPU each, or CPU), checkpoints in
## file://$(RESULTS)/ckpt, paused at step $(PAUSE) and resumed to $(STEPS); then
## the adaptor against the baselines on $(QUESTIONS) SQuAD v1.1 dev questions
## -> $(RESULTS)/eval
PAUSE ?= 4
WORKERS ?= 2
JOB = $(BIN)/coordinator --workers $(WORKERS) --listen 127.0.0.1:0 \
	  --checkpoint-url file://$(abspath $(RESULTS))/ckpt --keep-last 2
WORKER = $(BIN)/kv-distill worker --model $(SMOLLM2) \
	  --data file://$(DATA)/train/qa --data file://$(DATA)/train/text --data file://$(DATA)/train/synth \
	  --weights 2,1,2 --skip-bad-rows \
	  --steps $(STEPS) --global-batch 4 --micro-batch 2 --max-len 256 --text-suffix 64 --warmup 5 \
	  --log-every 1 --checkpoint-every 2 --out $(abspath $(RESULTS))/adaptor.safetensors
run: build
	test -f $(DATA)/train/multiqa/manifest.json || $(BIN)/kvd-data prepare --assets $(KVD_CACHE)/assets --out file://$(DATA)
	rm -rf $(RESULTS)/ckpt $(RESULTS)/adaptor.safetensors
	@echo "== train: $(WORKERS) workers, paused at step $(PAUSE)"
	KVD_TOKEN=$${KVD_TOKEN:-local-run} $(JOB) --stop-at $(PAUSE) --spawn-local -- $(WORKER)
	@echo "== resume from the latest checkpoint to step $(STEPS)"
	KVD_TOKEN=$${KVD_TOKEN:-local-run} $(JOB) --resume --spawn-local -- $(WORKER)
	$(BIN)/kv-distill eval --model $(SMOLLM2) --adaptor $(RESULTS)/adaptor.safetensors --squad $(SQUAD_DEV) \
	  --questions $(QUESTIONS) --ratios 1.0,0.1 --batch 8 --max-new-tokens 16 --out-dir $(RESULTS)/eval

## lint: formatting and clippy, warnings are errors
lint: setup
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings

## test: lint, then every test (parity against HF transformers, real models,
## real processes), then the deploy/ checks against the binaries cargo built.
## The slow transformers oracles warm up in the background while cargo compiles.
test: setup
	@scripts/warm_oracles.sh > $(KVD_CACHE)/warm_oracles.log 2>&1 & \
	$(MAKE) --no-print-directory lint && \
	cargo test --workspace -- --test-threads=2 && \
	$(MAKE) --no-print-directory test-deploy; status=$$?; wait; exit $$status

fmt:
	cargo fmt --all

## device-bundle: release binaries + scripts for the GPU machine, in .bin/ (git-ignored)
device-bundle: build
	rm -rf .bin && mkdir -p .bin
	cp $(BIN)/kv-distill .bin/

.PHONY: bench
## bench: data-loader throughput (file:// and local S3, 1 and 2 threads) -> data/BENCH.md
bench: setup
	data/bench.sh

.PHONY: bench-gpu
## bench-gpu: on a CUDA machine, the training step against the PyTorch reference
## (eager and compiled), with and without CUDA graphs -> docs/results/step/new/ (tables: bench/summarize_step.py)
bench-gpu: build
	KVD_PYTHON=$(VENV)/bin/python GRAPHS=1 bench/gpu_step.sh $(BIN)/kv-distill docs/results/step/new
	$(VENV)/bin/python bench/summarize_step.py docs/results/step/new/step.png docs/results/step/new/results.jsonl

.PHONY: test-deploy
## test-deploy: offline checks of deploy/ (about 80 s): render the kustomizations
## with kubectl's built-in kustomize (N = 2, 8 and others), validate every object
## (built-in kinds: kubernetes-validate; JobSet: its CRD schema in
## ../shared/schemas), check the manifests against the built binaries' flags, run
## deploy/entrypoint.sh with fake and real binaries, run the rendered pods
## (coordinator + 2 workers, their args and env) through it on CPU against a
## local S3 (moto) for a 3-step job, lint the Dockerfile (hadolint) and the
## script (shellcheck); broken copies must fail. The binaries come from
## KVD_TEST_BIN_DIR (default: the debug build that `cargo test --workspace`
## makes); missing or outdated ones fail the tests.
KVD_TEST_BIN_DIR ?= $(CARGO_TARGET_DIR)/debug
test-deploy: setup
	KVD_TEST_BIN_DIR="$(KVD_TEST_BIN_DIR)" $(VENV)/bin/python -m pytest -p no:cacheprovider -q deploy/tests
