#!/usr/bin/env bash
# The demo: a real etcd 3.4.23 data dir with a few hundred keys (some on leases), migrated to
# the newest etcd 3.5 in the bundle (Debian's current one, fetched by `make bundle`) by
# etcd-migrate with a per-step log, then `status`. Everything runs on free loopback ports
# and every process started here is stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
B=$PWD/.bundle
MIG=$PWD/target/release/etcd-migrate
D=$PWD/.demo
NEW=$(ls "$B" | sed -n 's/^etcd-\(3\.5\.[0-9]*\)$/\1/p' | sort -t. -k3,3n | tail -1)
[ -n "$NEW" ] || { echo "demo: no etcd 3.5 in $B: run make bundle" >&2; exit 1; }
rm -rf "$D"; mkdir -p "$D"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
CP=$(free_port); PP=$(free_port); EP=http://127.0.0.1:$CP
ETCD_PID=
trap '[ -n "$ETCD_PID" ] && kill "$ETCD_PID" 2>/dev/null; wait 2>/dev/null; true' EXIT

echo "== 1. a data dir written by real etcd 3.4.23"
"$B/etcd-3.4.23" --name demo --data-dir "$D/data" --listen-client-urls "$EP" --advertise-client-urls "$EP" \
  --listen-peer-urls "http://127.0.0.1:$PP" --initial-advertise-peer-urls "http://127.0.0.1:$PP" \
  --initial-cluster "demo=http://127.0.0.1:$PP" >"$D/etcd-3.4.23.log" 2>&1 &
ETCD_PID=$!
ctl() { ETCDCTL_API=3 "$B/etcdctl-3.4.23" --endpoints "$EP" "$@"; }
for _ in $(seq 1 100); do ctl endpoint health >/dev/null 2>&1 && break; sleep 0.1; done
LEASE=$(ctl lease grant 3600 | awk '{print $2}')
for i in $(seq 1 250); do ctl put "/registry/pods/default/pod-$i" "{\"kind\":\"Pod\",\"name\":\"pod-$i\"}" >/dev/null; done
for i in $(seq 1 50); do ctl put --lease="$LEASE" "/registry/events/default/event-$i" "{\"kind\":\"Event\",\"n\":$i}" >/dev/null; done
echo "wrote $(ctl get --prefix /registry --keys-only | grep -c /registry) keys (50 on a 1-hour lease)"
kill "$ETCD_PID"; wait "$ETCD_PID" 2>/dev/null || true; ETCD_PID=
echo "3.4.23/etcd3" > "$D/data/version.txt"

export TARGET_VERSION=$NEW TARGET_STORAGE=etcd3 DATA_DIRECTORY="$D/data" ETCD_BIN_DIR="$B" ETCD_NAME=demo \
  INITIAL_CLUSTER="demo=http://127.0.0.1:$PP" LISTEN_PEER_URLS="http://127.0.0.1:$PP" CHILD_OUTPUT=quiet
PORT=$(free_port)
echo
echo "== 2. etcd-migrate plan"
"$MIG" plan --port "$PORT"
echo
echo "== 3. etcd-migrate migrate (etcd output at debug level here; CHILD_OUTPUT=all shows it)"
"$MIG" migrate --port "$PORT"
echo
echo "== 4. etcd-migrate status"
"$MIG" status
echo
echo "== 5. a rerun at the target does nothing"
"$MIG" migrate --port "$PORT"
