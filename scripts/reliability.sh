#!/usr/bin/env bash
# Reliability figures: crashes at every failpoint, random kill -9s during a multi-step run, the
# bad-input table, disk-full cases, and the last fuzz run; printed and written to RELIABILITY.md.
# KILLS=50 by default (CRASH_RANDOM_KILLS of tests/crash.rs).
set -euo pipefail
cd "$(dirname "$0")/.."
kills=${KILLS:-50}
out=$(mktemp)
trap 'rm -f "$out" "$out.raw"' EXIT
# With --nocapture a test's output can start on the line of its name: keep "RESULT ..." wherever it is.
run() { cargo test --features failpoints "$@" -- --nocapture --test-threads=1 2>&1 | tee -a "$out.raw" | grep -oE "RESULT .*|test result.*|panicked.*" || true; grep -oE "RESULT .*" "$out.raw" > "$out" || true; }
CRASH_RANDOM_KILLS=$kills run --test crash
run --test reliability
grep -q "^RESULT failpoints" "$out" && grep -q "^RESULT random kills" "$out" && grep -q "^RESULT bad inputs" "$out" \
  && grep -q "^RESULT disk-full" "$out" || { echo "reliability: a check did not report (see above)"; exit 1; }
fuzz="no fuzz run recorded yet: run \`make fuzz\`"
[ -f testdata/fuzz/RESULTS.md ] && fuzz=$(cat testdata/fuzz/RESULTS.md)
{
  echo "# Reliability"
  echo
  echo "Made by \`make reliability\` (\`scripts/reliability.sh\`, KILLS=$kills) on $(date -u +%Y-%m-%d), $(nproc) cores, real etcd from \`.bundle/\`."
  echo "Rerun the command to reproduce; each figure is what the named test printed."
  echo
  echo "| check | result | test |"
  echo "|---|---|---|"
  sed -n 's/^RESULT failpoints crashed \(.*\)/| crash at every named failpoint (storage migration, native rollback, minor rollback, swap, durable writes, executor), rerun, compare with an uninterrupted run | \1 | tests\/crash.rs |/p' "$out"
  sed -n 's/^RESULT random kills \(.*\)/| kill -9 at a seeded random time during a multi-step run (etcd2 -> etcd3 with snapshot cut, then 3.5.1), rerun, compare | \1 | tests\/crash.rs |/p' "$out"
  sed -n 's/^RESULT bad inputs \(.*\)/| bad input (env, flags, version.txt, data dir shapes, bundle, targets, ports, locks, protobuf or writes only in the WAL on rollback, RESTORE_SNAPSHOT files that are missing, truncated, corrupted, not bbolt, too new or over other data, snapshot settings and a member not serving), exit code + message + tree hash unchanged | \1 | tests\/reliability.rs |/p' "$out"
  sed -n 's/^RESULT disk-full cases \(.*\)/| disk full on a tmpfs (storage migration refused early and full midway, minor rollback refused early, native rollback full midway, upgrade on a full disk): version.txt intact, data usable, rerun after freeing space completes | \1 | tests\/reliability.rs |/p' "$out"
  echo
  echo "## Fuzzing"
  echo
  echo "$fuzz"
  echo
  cat testdata/fuzz/FINDINGS.md
  echo
  echo "## What happens when an etcd is started on the data dir during a migration"
  echo
  echo "A second etcd-migrate exits 3 at once, naming the lock holder. An etcd started by hand on the"
  echo "data dir while a step's etcd runs blocks on bbolt's flock of \`member/snap/db\` until the step's"
  echo "etcd exits, then opens the data as it is (tests/reliability.rs checks that the migration still"
  echo "completes and every key is served afterwards). It cannot interleave writes with the step's etcd;"
  echo "but it serves the data at whatever version the step left, so do not start etcd by hand while a"
  echo "pod migrates. One started in the instant before the step's etcd has opened the backend takes"
  echo "the flock first: the step's etcd would wait for it, so after a second without a write the step"
  echo "looks up the lock's holder in /proc/locks and fails at once (exit 1, nothing recorded, the step's"
  echo "etcd stopped and reaped), naming that process; the hand-started etcd has the data as the last"
  echo "recorded step left it (tests/reliability.rs, \"backend locked by another process\")."
  echo
  echo "## A rollback to etcd2 after etcd 3.0 was killed"
  echo
  echo "etcd commits its v3 backend in batches and on a clean stop; after a kill (OOM, power loss) the"
  echo "last writes are only in the WAL, and etcd applies them on its next start. The native rollback"
  echo "reads the backend offline, so it first looks for WAL entries that can change keys (puts,"
  echo "deletes, lease revokes, transactions with writes) after the backend's consistent index. If"
  echo "there are any, etcd-<from> applies them with one private start and a clean stop; if it is not"
  echo "bundled, the rollback is refused (exit 2, data dir untouched) saying how to let etcd apply them"
  echo "(tests/rollback.rs, a 3.4.23 member killed with nothing committed; the bad-input table's"
  echo "\"writes only in the WAL on rollback\"). An entry that in the end changed nothing (a revoke of a"
  echo "lease already gone; with data written by etcd 3.4, also a transaction whose compare failed)"
  echo "counts too: such a tail is settled or refused although nothing is missing, never a lost key."
} > RELIABILITY.md
grep "^RESULT" "$out"
echo "wrote RELIABILITY.md"
