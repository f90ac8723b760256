#!/usr/bin/env bash
# Lays out the image's files in a directory, from images/etcd/layout and a parts dir.
# The Dockerfile runs it in its build stage (PARTS=official), `make rootfs` runs it on the host
# (and the Dockerfile's PARTS=local variant copies that rootfs), so both read the same list.
#
#   assemble.sh --parts DIR --out DIR [--layout FILE] [--versions "X.Y.Z ..."]
#
# The parts dir holds etcd-<ver>, etcdctl-<ver>, etcdutl-<ver> (3.5+), etcd-migrate, sh and
# migrate-if-needed.sh (files or symlinks to them). Versions default to every etcd-<X.Y.Z> there.
# The rootfs is built beside --out and renamed into place, so a failed run leaves the old one.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
layout=$here/layout
parts=
out=
versions_arg=
while [ $# -gt 0 ]; do
  case $1 in
    --parts) parts=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --layout) layout=$2; shift 2 ;;
    --versions) versions_arg=$2; shift 2 ;;
    *) echo "assemble: unknown argument $1" >&2; exit 2 ;;
  esac
done
if [ -z "$parts" ] || [ -z "$out" ]; then
  echo "usage: assemble.sh --parts DIR --out DIR [--layout FILE] [--versions LIST]" >&2
  exit 2
fi
[ -d "$parts" ] || { echo "assemble: parts dir $parts does not exist" >&2; exit 2; }

if [ -z "$versions_arg" ]; then
  versions_arg=$(find -L "$parts" -maxdepth 1 -name 'etcd-*' -printf '%f\n' | sed -n 's/^etcd-\([0-9]*\.[0-9]*\.[0-9]*\)$/\1/p')
fi
mapfile -t versions < <(tr ' ' '\n' <<<"$versions_arg" | grep . | sort -V -u)
[ ${#versions[@]} -gt 0 ] || { echo "assemble: no etcd-<X.Y.Z> in $parts" >&2; exit 2; }
newest=${versions[-1]}

# at_least A B: version A >= B (B may be X.Y).
at_least() { [ "$(printf '%s\n%s\n' "$2" "$1" | sort -V | head -n 1)" = "$2" ]; }

# The versions a line applies to (one empty word for "-").
expand() {
  case $1 in
    -) echo "-" ;;
    all) printf '%s\n' "${versions[@]}" ;;
    newest) echo "$newest" ;;
    newest\>=*) if at_least "$newest" "${1#newest>=}"; then echo "$newest"; fi ;;
    \>=*) for v in "${versions[@]}"; do if at_least "$v" "${1#>=}"; then echo "$v"; fi; done ;;
    *) echo "assemble: $layout: bad versions column '$1'" >&2; exit 2 ;;
  esac
}

# Copies the shared libraries a dynamically linked file needs to the same paths under the rootfs.
copy_libs() {
  local file=$1 root=$2 lib out_ldd
  if ! out_ldd=$(ldd "$file" 2>&1); then return 0; fi # "not a dynamic executable"
  case $out_ldd in *"statically linked"*) return 0 ;; esac
  for lib in $(printf '%s\n' "$out_ldd" | sed -n -e 's/.*=> \(\/[^ ]*\).*/\1/p' -e 's/^[[:space:]]*\(\/[^ ]*\) (.*/\1/p'); do
    if [ ! -e "$root$lib" ]; then
      mkdir -p "$root$(dirname "$lib")"
      cp -L "$lib" "$root$lib"
      echo "lib   $lib (for ${file#"$root"})"
    fi
  done
}

tmp="$out.assembling"
rm -rf "$tmp"
mkdir -p "$tmp"
count=0
while read -r path type mode source vers; do
  case $path in ''|'#'*) continue ;; esac
  [ -n "$vers" ] || { echo "assemble: $layout: short line for $path" >&2; exit 2; }
  vlist=$(expand "$vers")
  for v in $vlist; do
    p=${path//\{v\}/$v}
    s=${source//\{v\}/$v}
    case $type in
      dir) install -d -m "$mode" "$tmp/$p" ;;
      file)
        [ -e "$parts/$s" ] || { echo "assemble: the layout needs $s, which is not in $parts" >&2; exit 1; }
        install -D -m "$mode" "$parts/$s" "$tmp/$p" ;;
      link) mkdir -p "$(dirname "$tmp/$p")"; ln -sfn "$s" "$tmp/$p" ;;
      *) echo "assemble: $layout: bad type '$type' for $p" >&2; exit 2 ;;
    esac
    count=$((count + 1))
  done
done <"$layout"

while IFS= read -r -d '' f; do
  copy_libs "$f" "$tmp"
done < <(find "$tmp" -type f -perm -u+x -print0)

# Every link must resolve inside the rootfs.
while IFS= read -r -d '' l; do
  [ -e "$(dirname "$l")/$(readlink "$l")" ] || { echo "assemble: dangling link ${l#"$tmp"} -> $(readlink "$l")" >&2; exit 1; }
done < <(find "$tmp" -type l -print0)

rm -rf "$out"
mv "$tmp" "$out"
echo "rootfs: $out ($count entries; etcd ${versions[*]}; newest $newest)"
