#!/bin/sh
# migrate-if-needed.sh: what manifests written for the Kubernetes etcd image run before
# `exec /usr/local/bin/etcd ...`. Same contract: the environment says where to go
# (TARGET_STORAGE, TARGET_VERSION, DATA_DIRECTORY, INITIAL_CLUSTER, LISTEN_PEER_URLS,
# INITIAL_ADVERTISE_PEER_URLS, ETCD_CREDS, ...), exit 0 means the data is at the target.
# The work is etcd-migrate's; this script only finds it and guards the exec that follows.
# Shell builtins only: the image holds no other tools.
set -eu

case $0 in
  */*) bin=${0%/*} ;;
  *) bin=/usr/local/bin ;;
esac
# etcd-migrate finds etcd-<ver> beside this script unless told otherwise.
ETCD_BIN_DIR=${ETCD_BIN_DIR:-$bin}
export ETCD_BIN_DIR

# The Kubernetes image copied etcd-$TARGET_VERSION over /usr/local/bin/etcd unless
# DO_NOT_MOVE_BINARIES=true. This image is read-only and may run as non-root, so `etcd` always
# runs the newest bundled release; refuse, before touching anything, when the exec that follows
# would start another release than the target on the migrated data.
target=${TARGET_VERSION:-}
if [ -n "$target" ] && [ -x "$bin/etcd" ]; then
  runs=$(unset ETCD_VERSION; "$bin/etcd" --version 2>&1) || runs=
  case $runs in
    *"etcd Version: "*) runs=${runs#*"etcd Version: "}; runs=${runs%%[!0-9.]*} ;;
    *) echo "migrate-if-needed.sh: warning: cannot tell which release $bin/etcd is" >&2; runs= ;;
  esac
  if [ -n "$runs" ] && [ "$runs" != "$target" ]; then
    if [ "${DO_NOT_MOVE_BINARIES:-}" = true ]; then
      echo "migrate-if-needed.sh: warning: TARGET_VERSION=$target but $bin/etcd is etcd $runs;" \
        "DO_NOT_MOVE_BINARIES=true says the command after this script starts etcd-$target itself" >&2
    else
      echo "migrate-if-needed.sh: TARGET_VERSION=$target, but $bin/etcd is etcd $runs (the newest" \
        "release in this image) and this image does not repoint it: a command that execs $bin/etcd" \
        "after this script would start etcd $runs on $target data. Exec $bin/etcd-$target instead and" \
        "set DO_NOT_MOVE_BINARIES=true, use 'etcd-migrate run -- <etcd flags>' (it execs etcd-<target>" \
        "itself), or set TARGET_VERSION=$runs. Nothing was touched." >&2
      exit 2
    fi
  fi
fi

exec "$bin/etcd-migrate" migrate
