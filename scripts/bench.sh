#!/usr/bin/env bash
# Runs the benchmarks against real etcd and rewrites BENCHMARKS.md with the figures.
# `scripts/bench.sh p1 p2` runs a subset (p1 p2 p3 p3step p4 p6 ha rejoin sizes dr).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release
cargo bench --bench bench -- "${@:-all}"
