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
PROMPT ?= What is the capital of France?

.PHONY: setup build run test lint fmt bench-gpu device-bundle

## setup: venv with torch 2.11.0 + oracles, real models and data (idempotent)
setup:
	@scripts/setup.sh

## build: the release kv-distill binary
build: setup
	cargo build --release -p kvd-trainer --bins

## run: the embedded default job: SmolLM2-135M-Instruct answers a chat prompt on this machine
run: build
	$(BIN)/kv-distill generate --model $(SMOLLM2) --chat --prompt "$(PROMPT)" --max-new-tokens 64

## lint: formatting and clippy, warnings are errors
lint: setup
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings

## test: lint, then every test (parity against HF transformers, real models).
## The slow transformers oracles warm up in the background while cargo compiles.
test: setup
	@scripts/warm_oracles.sh > $(KVD_CACHE)/warm_oracles.log 2>&1 & \
	$(MAKE) --no-print-directory lint && \
	cargo test --workspace -- --test-threads=2; status=$$?; wait; exit $$status

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
