#!/usr/bin/env bash
# Fetches official etcd release archives into a parts dir as etcd-<ver>, etcdctl-<ver> and
# etcdutl-<ver> (3.5+), verifying each archive's SHA-256 first. Run by the Dockerfile's
# PARTS=official stage.
#
#   fetch-etcd.sh --versions "3.4.23 3.5.30" --arch amd64 --out DIR
#
# Each archive must match its line in release-sha256.txt (beside this script) when that file
# pins it; otherwise the release's own SHA256SUMS must list it. An archive with neither is
# refused: pin it with `sha256sum etcd-v<ver>-linux-<arch>.tar.gz >> release-sha256.txt`.
# ETCD_RELEASE_URL (default the GitHub releases) may point at a mirror, or at file:// in tests.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
pins=$here/release-sha256.txt
base=${ETCD_RELEASE_URL:-https://github.com/etcd-io/etcd/releases/download}
versions=
arch=
out=
while [ $# -gt 0 ]; do
  case $1 in
    --versions) versions=$2; shift 2 ;;
    --arch) arch=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --pins) pins=$2; shift 2 ;;
    *) echo "fetch-etcd: unknown argument $1" >&2; exit 2 ;;
  esac
done
if [ -z "$versions" ] || [ -z "$arch" ] || [ -z "$out" ]; then
  echo "usage: fetch-etcd.sh --versions LIST --arch amd64|arm64 --out DIR" >&2
  exit 2
fi
case $arch in amd64 | arm64 | ppc64le | s390x) ;; *) echo "fetch-etcd: etcd publishes no linux-$arch release" >&2; exit 2 ;; esac

mkdir -p "$out"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

for v in $versions; do
  [[ $v =~ ^[0-9]+\.[0-9]+\.[0-9]+$ ]] || { echo "fetch-etcd: '$v' is not X.Y.Z" >&2; exit 2; }
  name=etcd-v$v-linux-$arch
  archive=$name.tar.gz
  if ! curl -fsSL --retry 3 -o "$work/$archive" "$base/v$v/$archive"; then
    echo "fetch-etcd: cannot download $base/v$v/$archive (older releases have no linux-$arch build: drop $v from ETCD_VERSIONS)" >&2
    exit 1
  fi
  want=$(awk -v f="$archive" '$2 == f || $2 == "*"f { print $1 }' "$pins" 2>/dev/null | head -n 1)
  how="pinned in $(basename "$pins")"
  if [ -z "$want" ]; then
    if curl -fsSL --retry 3 -o "$work/SHA256SUMS-$v" "$base/v$v/SHA256SUMS"; then
      want=$(awk -v f="$archive" '$2 == f || $2 == "*"f { print $1 }' "$work/SHA256SUMS-$v" | head -n 1)
      how="from the release's SHA256SUMS"
    fi
  fi
  if [ -z "$want" ]; then
    echo "fetch-etcd: no checksum for $archive: neither $(basename "$pins") nor the release's SHA256SUMS lists it; pin it after checking it by hand" >&2
    exit 1
  fi
  got=$(sha256sum "$work/$archive" | awk '{ print $1 }')
  if [ "$got" != "$want" ]; then
    echo "fetch-etcd: $archive has SHA-256 $got, expected $want ($how); refusing it" >&2
    exit 1
  fi
  tar -xzf "$work/$archive" -C "$work"
  for tool in etcd etcdctl etcdutl; do
    if [ -f "$work/$name/$tool" ]; then
      install -m 0755 "$work/$name/$tool" "$out/$tool-$v"
    elif [ "$tool" != etcdutl ]; then
      echo "fetch-etcd: $archive holds no $tool" >&2
      exit 1
    fi
  done
  echo "fetch-etcd: etcd $v ($arch) verified $how"
done
