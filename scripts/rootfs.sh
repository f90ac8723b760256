#!/usr/bin/env bash
# `make rootfs`: the image's files (images/etcd/layout) in a directory, default .rootfs/, from the
# etcd binaries in .bundle/ and etcd-migrate built static (crt-static, so it runs in a FROM scratch
# image). The Dockerfile's PARTS=local variant copies this directory as the whole image.
#   scripts/rootfs.sh [OUT]
# BUNDLE (default .bundle), MIGRATE_BIN (default: build the static release binary) and
# ROOTFS_SHELL (default Debian's /bin/bash-static) override the parts; the tests pass their own
# etcd-migrate binary here, so they check the layout `make rootfs` makes, by the same script.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-.rootfs}
bundle=${BUNDLE:-.bundle}
migrate=${MIGRATE_BIN:-}
shell=${ROOTFS_SHELL:-/bin/bash-static}

[ -x "$shell" ] || { echo "rootfs: $shell is missing; run 'make image-deps' (Debian's bash-static)" >&2; exit 1; }
ls "$bundle"/etcd-* >/dev/null 2>&1 || { echo "rootfs: no etcd binaries in $bundle; run 'make bundle'" >&2; exit 1; }
if [ -z "$migrate" ]; then
  triple=$(rustc -vV | sed -n 's/^host: //p')
  RUSTFLAGS="-C target-feature=+crt-static" ${CARGO:-cargo} build --release --locked --target "$triple"
  migrate=target/$triple/release/etcd-migrate
fi
[ -x "$migrate" ] || { echo "rootfs: $migrate is not an executable" >&2; exit 1; }

parts=$(mktemp -d)
trap 'rm -rf "$parts"' EXIT
for f in "$bundle"/etcd-* "$bundle"/etcdctl-* "$bundle"/etcdutl-*; do
  [ -e "$f" ] && ln -s "$(realpath "$f")" "$parts/$(basename "$f")"
done
ln -s "$(realpath "$migrate")" "$parts/etcd-migrate"
ln -s "$(realpath "$shell")" "$parts/sh"
ln -s "$PWD/images/etcd/migrate-if-needed.sh" "$parts/migrate-if-needed.sh"
images/etcd/assemble.sh --parts "$parts" --out "$out"
