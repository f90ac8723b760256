#!/usr/bin/env bash
# Runs the cargo-fuzz targets in fuzz/ (libFuzzer + AddressSanitizer), one at a time, on one core.
#
#   scripts/fuzz.sh smoke [target...]   each target for FUZZ_SECONDS (default 20), for `make test`
#   scripts/fuzz.sh long  [target...]   each target for FUZZ_SECONDS (default 600), for `make fuzz`
#   scripts/fuzz.sh list                the targets
#
# Environment:
#   FUZZ_SECONDS   seconds per target (overrides the mode's default)
#   FUZZ_RUNS      a fixed number of inputs per target instead of a duration
#   FUZZ_REPORT    a file to append one tab-separated line per target to:
#                  utc, mode, target, runs, seconds, crashes, sanitizer
#   FUZZ_SANITIZER address (default: libFuzzer + AddressSanitizer, needs RUSTC_BOOTSTRAP=1 on
#                  stable, set here) or none (libFuzzer alone: plain stable, no -Z flag)
#   CARGO          cargo to use (default: cargo)
#
# Seeds are testdata/fuzz/<target>/ (read only); what the fuzzer finds goes to the work corpus
# fuzz/corpus/<target>/ (not committed) and is reused by the next run. A crash, panic, hang
# (> 10 s on one input) or out-of-memory (> 2 GB) is written to fuzz/artifacts/<target>/ and
# stops that target. Prints, per target: runs executed, seconds, crashes found. Exits 1 if any
# target found one, 2 on a usage or build error.
#
# cargo-fuzz needs nightly only for `-Zsanitizer=address`; RUSTC_BOOTSTRAP=1 lets the stable
# toolchain accept it (stable ships the sanitizer runtimes), so this runs on the machine's stable.
# Coverage instrumentation itself (-Cpasses=sancov-module) is stable: FUZZ_SANITIZER=none
# needs no bootstrap flag at all.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
CARGO=${CARGO:-cargo}
FUZZ_DIR=$ROOT/fuzz
SEEDS=$ROOT/testdata/fuzz
ALL_TARGETS=(version_file bbolt wal snap snapshot)

usage() {
    sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0" >&2
    exit 2
}

[ $# -ge 1 ] || usage
MODE=$1
shift
case $MODE in
    smoke) DEFAULT_SECONDS=20 ;;
    long) DEFAULT_SECONDS=600 ;;
    list) printf '%s\n' "${ALL_TARGETS[@]}"; exit 0 ;;
    *) usage ;;
esac
SECONDS_PER_TARGET=${FUZZ_SECONDS:-$DEFAULT_SECONDS}
TARGETS=("$@")
[ ${#TARGETS[@]} -gt 0 ] || TARGETS=("${ALL_TARGETS[@]}")
for t in "${TARGETS[@]}"; do
    [[ " ${ALL_TARGETS[*]} " == *" $t "* ]] || { echo "fuzz: unknown target '$t' (${ALL_TARGETS[*]})" >&2; exit 2; }
done

if ! "$CARGO" fuzz --version >/dev/null 2>&1; then
    echo "fuzz: cargo-fuzz is missing: installing it (cargo install cargo-fuzz --locked)" >&2
    "$CARGO" install cargo-fuzz --locked >&2 || { echo "fuzz: could not install cargo-fuzz" >&2; exit 2; }
fi

SANITIZER=${FUZZ_SANITIZER:-address}
# --debug-assertions: integer overflow and debug_assert! panic, as in `cargo test`.
BUILD_FLAGS=(--fuzz-dir "$FUZZ_DIR" --debug-assertions --sanitizer "$SANITIZER")
TARGET_DIR=$FUZZ_DIR/target
case $SANITIZER in
    address) export RUSTC_BOOTSTRAP=1 ;;
    none)
        # Its own target dir, so that switching does not rebuild the other.
        TARGET_DIR=$FUZZ_DIR/target/sanitizer-none
        BUILD_FLAGS+=(--target-dir "$TARGET_DIR")
        ;;
    *) echo "fuzz: FUZZ_SANITIZER must be address or none" >&2; exit 2 ;;
esac
echo "fuzz: building ${TARGETS[*]} ($("$CARGO" fuzz --version), $(rustc --version), sanitizer $SANITIZER)" >&2
for t in "${TARGETS[@]}"; do
    "$CARGO" fuzz build "${BUILD_FLAGS[@]}" "$t" >&2 || { echo "fuzz: build of $t failed" >&2; exit 2; }
done
TRIPLE=$(rustc -vV | sed -n 's/^host: //p')
BIN_DIR=$TARGET_DIR/$TRIPLE/release

# Files the targets write per input go to a tmpfs dir of our own, removed on exit.
SCRATCH_BASE=/dev/shm
[ -d "$SCRATCH_BASE" ] && [ -w "$SCRATCH_BASE" ] || SCRATCH_BASE=${TMPDIR:-/tmp}
SCRATCH=$(mktemp -d "$SCRATCH_BASE/etcd-migrate-fuzz.XXXXXX")
export ETCD_MIGRATE_FUZZ_TMP=$SCRATCH
LOGS=$(mktemp -d "${TMPDIR:-/tmp}/etcd-migrate-fuzz-logs.XXXXXX")
trap 'rm -rf "$SCRATCH" "$LOGS"' EXIT

if [ -n "${FUZZ_RUNS:-}" ]; then
    LIMIT=(-runs="$FUZZ_RUNS")
    echo "fuzz: $MODE: ${FUZZ_RUNS} inputs per target" >&2
else
    LIMIT=(-max_total_time="$SECONDS_PER_TARGET")
    echo "fuzz: $MODE: ${SECONDS_PER_TARGET} s per target" >&2
fi

failed=0
total_runs=0
total_seconds=0
printf '%-13s %12s %9s %8s\n' target runs seconds crashes
for t in "${TARGETS[@]}"; do
    corpus=$FUZZ_DIR/corpus/$t
    artifacts=$FUZZ_DIR/artifacts/$t
    mkdir -p "$corpus" "$artifacts"
    before=$(find "$artifacts" -type f | wc -l)
    dict=()
    [ -f "$FUZZ_DIR/dicts/$t.dict" ] && dict=(-dict="$FUZZ_DIR/dicts/$t.dict")
    log=$LOGS/$t.log
    start=$(date +%s.%N)
    set +e
    "$BIN_DIR/$t" "${LIMIT[@]}" "${dict[@]}" \
        -artifact_prefix="$artifacts/" -timeout=10 -rss_limit_mb=2048 \
        -print_final_stats=1 "$corpus" "$SEEDS/$t" >"$log" 2>&1
    rc=$?
    set -e
    end=$(date +%s.%N)
    secs=$(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.0f", b - a }')
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
    if [ -z "$runs" ]; then
        # No final stats (the fuzzer died): take the last status line's count.
        runs=$(grep -oE '^#[0-9]+' "$log" | tail -n 1 | tr -d '#')
    fi
    runs=${runs:-0}
    after=$(find "$artifacts" -type f | wc -l)
    crashes=$((after - before))
    if [ "$rc" -ne 0 ] && [ "$crashes" -eq 0 ]; then
        crashes=1 # died without writing an artifact (e.g. the fuzzer itself failed)
    fi
    printf '%-13s %12s %9s %8s\n' "$t" "$runs" "$secs" "$crashes"
    if [ -n "${FUZZ_REPORT:-}" ]; then
        printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$MODE" "$t" "$runs" "$secs" "$crashes" "$SANITIZER" >>"$FUZZ_REPORT"
    fi
    total_runs=$((total_runs + runs))
    total_seconds=$((total_seconds + secs))
    if [ "$crashes" -ne 0 ]; then
        failed=1
        echo "fuzz: $t FAILED (exit $rc); libFuzzer's report:" >&2
        grep -E -A40 '^(==[0-9]+==ERROR|thread .* panicked|ALARM|ERROR: libFuzzer)' "$log" | head -n 60 >&2 || tail -n 40 "$log" >&2
        find "$artifacts" -type f -newermt "@${start%.*}" | while read -r a; do
            echo "fuzz: input saved as ${a#"$ROOT"/}; reproduce with:" >&2
            if [ "$SANITIZER" = address ]; then
                echo "  RUSTC_BOOTSTRAP=1 cargo fuzz run --fuzz-dir fuzz --debug-assertions $t ${a#"$ROOT"/}" >&2
            else
                echo "  cargo fuzz run --fuzz-dir fuzz --debug-assertions --sanitizer none --target-dir fuzz/target/sanitizer-none $t ${a#"$ROOT"/}" >&2
            fi
        done
    fi
done
printf '%-13s %12s %9s\n' total "$total_runs" "$total_seconds"
if [ "$failed" -ne 0 ]; then
    echo "fuzz: $MODE: a target crashed" >&2
    exit 1
fi
echo "fuzz: $MODE: ${#TARGETS[@]} targets, 0 crashes" >&2
