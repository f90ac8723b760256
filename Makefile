# etcd-migrate. Two commands set up a fresh Debian machine:
#   make demo   builds, migrates a real etcd 3.4.23 demo data dir to 3.5.1, shows status
#   make test   installs what it needs (apt, pip, cargo) and runs every test
SHELL := /bin/bash
CARGO ?= cargo
FEATURES := --features failpoints

.PHONY: all deps bundle build release test unit acceptance demo bench lint fmt reliability fuzz fuzz-deps rootfs image clean

all: build

# Build and test prerequisites, idempotent: protoc for etcd-client, the etcd bundle.
deps:
	@command -v protoc >/dev/null && [ -f /usr/include/google/protobuf/timestamp.proto ] || { \
	  echo "installing protobuf-compiler libprotobuf-dev"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q protobuf-compiler libprotobuf-dev >/dev/null 2>&1 \
	  || { $$SUDO apt-get update -q >/dev/null && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q protobuf-compiler libprotobuf-dev >/dev/null; }; }
	@command -v $(CARGO) >/dev/null || { echo "cargo is missing: install Rust (https://rustup.rs)"; exit 1; }
	@scripts/image-deps.sh

bundle:
	@scripts/bundle.sh .bundle >/dev/null && echo "bundle: $$(ls .bundle | tr '\n' ' ')"

build: deps
	$(CARGO) build --release

release: build

# Every test: unit, property, and integration tests against real etcd processes, then a short
# fuzzing smoke run of every fuzz target.
test: deps bundle fuzz-deps
	$(CARGO) fmt --check
	$(CARGO) clippy --all-targets $(FEATURES) -- -D warnings
	$(CARGO) test $(FEATURES) -- --test-threads=2
	scripts/fuzz.sh smoke

# cargo-fuzz for the targets in fuzz/ (runs on stable: scripts/fuzz.sh sets RUSTC_BOOTSTRAP=1).
fuzz-deps:
	@$(CARGO) fuzz --version >/dev/null 2>&1 || $(CARGO) install cargo-fuzz --locked

# Long fuzzing: FUZZ_SECONDS per target (default 600); results in testdata/fuzz/results.tsv,
# summarized in testdata/fuzz/RESULTS.md for RELIABILITY.md.
fuzz: deps fuzz-deps
	FUZZ_REPORT=$${FUZZ_REPORT:-testdata/fuzz/results.tsv} scripts/fuzz.sh long
	scripts/fuzz-summary.sh testdata/fuzz/results.tsv > testdata/fuzz/RESULTS.md

unit: deps
	$(CARGO) test $(FEATURES) --lib

# The acceptance checks shipped beside the repo (../shared/acceptance).
acceptance: build bundle
	../shared/acceptance/run-all

demo: build bundle
	scripts/demo.sh

bench: build bundle
	scripts/bench.sh

# Crash, kill -9, bad-input and disk-full figures (and the last fuzz run) into RELIABILITY.md.
reliability: deps bundle
	scripts/reliability.sh

lint:
	$(CARGO) fmt --check
	$(CARGO) clippy --all-targets $(FEATURES) -- -D warnings

fmt:
	$(CARGO) fmt

clean:
	$(CARGO) clean
	rm -rf .demo

# Building and testing the image: buildah, bash-static (the image's /bin/sh), curl, shellcheck,
# hadolint (into .tools/). Idempotent: installs only what is missing.
.PHONY: image-deps
image-deps:
	@scripts/image-deps.sh

# The image's files (images/etcd/layout) in .rootfs/, from .bundle/ and etcd-migrate built static:
# what the Dockerfile's PARTS=local variant copies; chroot-able (dynamic parts get their libs).
rootfs: deps bundle
	scripts/rootfs.sh .rootfs

# The image from images/etcd/Dockerfile with docker, podman or buildah, whichever works here.
# PARTS=local (default: from `make rootfs`, no registry needed) or PARTS=official (fetches the
# etcd releases, checksums verified). IMAGE=, ENGINE=, OCI_ARCHIVE=, PLATFORMS= as in the script.
PARTS ?= local
image: $(if $(filter local,$(PARTS)),rootfs,image-deps)
	PARTS=$(PARTS) scripts/build-image.sh
