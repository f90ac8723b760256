#!/usr/bin/env bash
# The kube-up style bootstrap: renders the etcd static-pod templates (manifests/etcd.manifest,
# manifests/etcd-events.manifest) from a small settings file into the kubelet's manifests dir.
#
#   scripts/render-manifests.sh [--settings FILE] [--out DIR] [--only etcd|etcd-events] [--templates DIR]
#
# Settings: manifests/settings.env documents every key and its default. Precedence, lowest first:
# defaults, the settings file, the environment. --out defaults to /etc/kubernetes/manifests.
# Each manifest is written to a dot-file (which the kubelet ignores) and renamed into place, so
# the kubelet never reads half a pod. Values are checked (versions, ports, names) and JSON-quoted;
# a template placeholder without a value stops the render.
set -euo pipefail
shopt -u patsub_replacement 2>/dev/null || true

here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
templates=$here/manifests
settings=
out=/etc/kubernetes/manifests
only=
while [ $# -gt 0 ]; do
  case $1 in
    --settings) settings=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --only) only=$2; shift 2 ;;
    --templates) templates=$2; shift 2 ;;
    -h | --help) sed -n '2,11p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "render-manifests: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

die() { echo "render-manifests: $*" >&2; exit 2; }

KEYS=(TARGET_VERSION TARGET_STORAGE ETCD_HOSTNAME ETCD_ADVERTISE_HOST ETCD_HOST_IP ETCD_LISTEN_CLIENT_IP
  ETCD_PEER_PROTOCOL ETCD_CLIENT_PROTOCOL ETCD_CLIENT_PORT ETCD_PEER_PORT ETCD_MIGRATE_PORT
  ETCD_EVENTS_CLIENT_PORT ETCD_EVENTS_PEER_PORT ETCD_EVENTS_MIGRATE_PORT ETCD_INITIAL_CLUSTER
  ETCD_EVENTS_INITIAL_CLUSTER ETCD_CLUSTER_STATE ETCD_CREDS ETCD_APISERVER_CREDS ETCD_EXTRA_ARGS
  ETCDCTL_CERTS ETCD_IMAGE ETCD_DATA_ROOT ETCD_CREDS_DIR ETCD_RUN_AS_USER ETCD_RUN_AS_GROUP
  ETCD_CPU_REQUEST ETCD_EVENTS_CPU_REQUEST ETCD_SNAPSHOT_COUNT ETCD_LIVENESS_INITIAL_DELAY
  ETCD_STARTUP_FAILURE_THRESHOLD ETCD_TERMINATION_GRACE ETCD_REJOIN_IF_EMPTY ETCD_SNAPSHOT_EVERY
  ETCD_SNAPSHOT_KEEP ETCD_SNAPSHOT_DIR ETCD_EVENTS_SNAPSHOT_DIR ETCD_RESTORE_SNAPSHOT ETCD_EVENTS_RESTORE_SNAPSHOT)
declare -A S=(
  [TARGET_VERSION]=3.5.30 [TARGET_STORAGE]=etcd3 [ETCD_HOSTNAME]="$(hostname)" [ETCD_ADVERTISE_HOST]=""
  [ETCD_HOST_IP]=127.0.0.1 [ETCD_LISTEN_CLIENT_IP]=127.0.0.1 [ETCD_PEER_PROTOCOL]=http
  [ETCD_CLIENT_PROTOCOL]=http [ETCD_CLIENT_PORT]=2379 [ETCD_PEER_PORT]=2380 [ETCD_MIGRATE_PORT]=""
  [ETCD_EVENTS_CLIENT_PORT]=4002 [ETCD_EVENTS_PEER_PORT]=2381 [ETCD_EVENTS_MIGRATE_PORT]=""
  [ETCD_INITIAL_CLUSTER]="" [ETCD_EVENTS_INITIAL_CLUSTER]="" [ETCD_CLUSTER_STATE]=new [ETCD_CREDS]=""
  [ETCD_APISERVER_CREDS]="" [ETCD_EXTRA_ARGS]="" [ETCDCTL_CERTS]="" [ETCD_IMAGE]=localhost/etcd-migrate:latest
  [ETCD_DATA_ROOT]=/var/etcd [ETCD_CREDS_DIR]=/etc/srv/kubernetes [ETCD_RUN_AS_USER]=0
  [ETCD_RUN_AS_GROUP]=0 [ETCD_CPU_REQUEST]=200m [ETCD_EVENTS_CPU_REQUEST]=100m
  [ETCD_SNAPSHOT_COUNT]=10000 [ETCD_LIVENESS_INITIAL_DELAY]=15 [ETCD_STARTUP_FAILURE_THRESHOLD]=90
  [ETCD_TERMINATION_GRACE]=60 [ETCD_REJOIN_IF_EMPTY]=false [ETCD_SNAPSHOT_EVERY]="" [ETCD_SNAPSHOT_KEEP]=10
  [ETCD_SNAPSHOT_DIR]=/var/lib/etcd-snapshots [ETCD_EVENTS_SNAPSHOT_DIR]=/var/lib/etcd-events-snapshots
  [ETCD_RESTORE_SNAPSHOT]="" [ETCD_EVENTS_RESTORE_SNAPSHOT]="")
# Where the snapshot dir (ETCD_SNAPSHOT_DIR or ETCD_EVENTS_SNAPSHOT_DIR) is mounted in the pod.
SNAPSHOT_MOUNT=/etcd-snapshots

# The settings file: KEY=value, optional quotes, `#` comments; nothing is expanded.
if [ -n "$settings" ]; then
  [ -f "$settings" ] || die "settings file $settings does not exist"
  n=0
  while IFS= read -r line || [ -n "$line" ]; do
    n=$((n + 1))
    [[ $line =~ ^[[:space:]]*(#.*)?$ ]] && continue
    [[ $line =~ ^[[:space:]]*([A-Z_][A-Z0-9_]*)=(.*)$ ]] || die "$settings:$n: expected KEY=value"
    key=${BASH_REMATCH[1]} rest=${BASH_REMATCH[2]}
    [ -n "${S[$key]+set}" ] || die "$settings:$n: unknown setting $key (manifests/settings.env lists them)"
    if [[ $rest =~ ^\'([^\']*)\'[[:space:]]*(#.*)?$ ]] || [[ $rest =~ ^\"([^\"]*)\"[[:space:]]*(#.*)?$ ]]; then
      S[$key]=${BASH_REMATCH[1]}
    elif [[ $rest =~ ^([^\'\"#[:space:]][^#]*[^#[:space:]]|[^\'\"#[:space:]]?)[[:space:]]*(#.*)?$ ]]; then
      S[$key]=${BASH_REMATCH[1]}
    else
      die "$settings:$n: cannot read the value of $key (unbalanced quotes, or a '#' inside an unquoted value)"
    fi
  done <"$settings"
fi
for key in "${KEYS[@]}"; do
  if [ -n "${!key+set}" ]; then S[$key]=${!key}; fi
done

# Checks.
[[ ${S[TARGET_VERSION]} =~ ^[0-9]+\.[0-9]+\.[0-9]+$ ]] || die "TARGET_VERSION=${S[TARGET_VERSION]}: expected X.Y.Z"
[[ ${S[TARGET_STORAGE]} =~ ^etcd[23]$ ]] || die "TARGET_STORAGE=${S[TARGET_STORAGE]}: expected etcd2 or etcd3"
[[ ${S[ETCD_HOSTNAME]} =~ ^[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?$ ]] || die "ETCD_HOSTNAME=${S[ETCD_HOSTNAME]}: not a host name"
[ -n "${S[ETCD_ADVERTISE_HOST]}" ] || S[ETCD_ADVERTISE_HOST]=${S[ETCD_HOSTNAME]}
for k in ETCD_CLIENT_PORT ETCD_PEER_PORT ETCD_EVENTS_CLIENT_PORT ETCD_EVENTS_PEER_PORT ETCD_MIGRATE_PORT ETCD_EVENTS_MIGRATE_PORT; do
  v=${S[$k]}
  [ -z "$v" ] && [[ $k == *MIGRATE_PORT ]] && continue
  if ! [[ $v =~ ^[0-9]+$ ]] || [ "$v" -lt 1 ] || [ "$v" -gt 65535 ]; then die "$k=$v: expected a port number"; fi
done
for k in ETCD_RUN_AS_USER ETCD_RUN_AS_GROUP ETCD_SNAPSHOT_COUNT ETCD_LIVENESS_INITIAL_DELAY ETCD_STARTUP_FAILURE_THRESHOLD ETCD_TERMINATION_GRACE; do
  [[ ${S[$k]} =~ ^[0-9]+$ ]] || die "$k=${S[$k]}: expected a whole number"
done
for k in ETCD_PEER_PROTOCOL ETCD_CLIENT_PROTOCOL; do
  [[ ${S[$k]} =~ ^https?$ ]] || die "$k=${S[$k]}: expected http or https"
done
[[ ${S[ETCD_REJOIN_IF_EMPTY]} =~ ^(true|false)$ ]] || die "ETCD_REJOIN_IF_EMPTY=${S[ETCD_REJOIN_IF_EMPTY]}: expected true or false"
[[ ${S[ETCD_CLUSTER_STATE]} =~ ^(new|existing)$ ]] || die "ETCD_CLUSTER_STATE=${S[ETCD_CLUSTER_STATE]}: expected new or existing"
[[ ${S[ETCD_DATA_ROOT]} == /* ]] || die "ETCD_DATA_ROOT=${S[ETCD_DATA_ROOT]}: expected an absolute path"
[[ ${S[ETCD_CREDS_DIR]} == /* ]] || die "ETCD_CREDS_DIR=${S[ETCD_CREDS_DIR]}: expected an absolute path"

# A value inside a JSON string.
json() {
  local s=$1
  [[ ${s//$'\t'/} =~ [[:cntrl:]] ]] && die "a value holds a control character: $(printf '%q' "$s")"
  s=${s//\\/\\\\}
  s=${s//\"/\\\"}
  s=${s//$'\t'/\\t}
  printf '%s' "$s"
}

# Shell-quoted flags as more elements of a JSON array: `, "a", "b"` (empty for none). xargs
# splits like a shell (quotes, backslashes) without expanding anything.
json_args() {
  local split w acc=
  [ -n "$1" ] || return 0
  # The value is not shown: it may name secrets.
  split=$(printf '%s\n' "$1" | xargs printf '%s\0' 2>/dev/null | tr '\0' '\1') \
    || die "$2 cannot be split into flags (unbalanced quotes?)"
  while IFS= read -r -d $'\1' w; do
    acc+=", \"$(json "$w")\""
  done <<<"$split"
  printf '%s' "$acc"
}

# Snapshots and restore. The sidecar's ETCD_CREDS is ETCD_CREDS then ETCD_APISERVER_CREDS:
# `etcd-migrate snapshot` takes its client TLS (--trusted-ca-file, --cert-file, --key-file or
# --client-cert-file, --client-key-file) from there and ignores the --peer-* flags.
every=${S[ETCD_SNAPSHOT_EVERY]}
if [ -n "$every" ] && ! [[ $every =~ ^0*[1-9][0-9]*[smh]$ ]]; then
  die "ETCD_SNAPSHOT_EVERY=$every: expected empty (no snapshot sidecar) or a duration other than 0: digits then s, m or h, e.g. 30m"
fi
[[ ${S[ETCD_SNAPSHOT_KEEP]} =~ ^0*[1-9][0-9]*$ ]] || die "ETCD_SNAPSHOT_KEEP=${S[ETCD_SNAPSHOT_KEEP]}: expected a whole number >= 1"
for k in ETCD_SNAPSHOT_DIR ETCD_EVENTS_SNAPSHOT_DIR; do
  v=${S[$k]}
  while [[ $v == */ ]]; do v=${v%/}; done
  [[ $v == /?* ]] || die "$k=${S[$k]}: expected an absolute path other than /"
  S[$k]=$v
done
snapshot_creds=${S[ETCD_CREDS]}${S[ETCD_CREDS]:+${S[ETCD_APISERVER_CREDS]:+ }}${S[ETCD_APISERVER_CREDS]}
if [ -n "$every" ]; then
  # Both members are named etcd-<hostname>: in one dir each sidecar would prune the other's files.
  [ "${S[ETCD_SNAPSHOT_DIR]}" != "${S[ETCD_EVENTS_SNAPSHOT_DIR]}" ] \
    || die "ETCD_SNAPSHOT_DIR and ETCD_EVENTS_SNAPSHOT_DIR are both ${S[ETCD_SNAPSHOT_DIR]}: give etcd and etcd-events a dir each (their snapshots have the same member name)"
  a=$(json_args "$snapshot_creds" "ETCD_CREDS with ETCD_APISERVER_CREDS")
  if [ "${S[ETCD_CLIENT_PROTOCOL]}" = https ] && [[ $a != *'"--trusted-ca-file='* && $a != *'"--trusted-ca-file"'* ]]; then
    die "ETCD_SNAPSHOT_EVERY=$every with ETCD_CLIENT_PROTOCOL=https: the snapshot sidecar needs --trusted-ca-file in ETCD_APISERVER_CREDS (or ETCD_CREDS)"
  fi
fi
# A snapshot to restore is named by its path on the host, in the member's own snapshot dir; the
# pod sees it under $SNAPSHOT_MOUNT.
declare -A RESTORE_IN_POD=()
for spec in etcd:ETCD_SNAPSHOT_DIR:ETCD_RESTORE_SNAPSHOT etcd-events:ETCD_EVENTS_SNAPSHOT_DIR:ETCD_EVENTS_RESTORE_SNAPSHOT; do
  IFS=: read -r name dk rk <<<"$spec"
  f=${S[$rk]} d=${S[$dk]}
  RESTORE_IN_POD[$name]=
  [ -n "$f" ] || continue
  rel=${f#"$d"/}
  if [[ $f != "$d"/* || /$rel/ == *//* || /$rel/ == */./* || /$rel/ == */../* ]]; then
    die "$rk=$f: expected the host path of a snapshot file in $dk (${d}), which the pod mounts at $SNAPSHOT_MOUNT"
  fi
  RESTORE_IN_POD[$name]=$SNAPSHOT_MOUNT/$rel
done

# render TEMPLATE client_port peer_port migrate_port initial_cluster cpu snapshot_dir restore_in_pod
render() {
  local name=$1 port=$2 server_port=$3 migrate_port=$4 cluster=$5 cpu=$6 snapdir=$7 restore=$8
  local tpl="$templates/$name.manifest" dst="$out/$name.manifest" text key val
  [ -f "$tpl" ] || die "no template $tpl"
  local host=${S[ETCD_HOSTNAME]} adv=${S[ETCD_ADVERTISE_HOST]} pproto=${S[ETCD_PEER_PROTOCOL]} cproto=${S[ETCD_CLIENT_PROTOCOL]}
  [ -n "$cluster" ] || cluster="etcd-$host=$pproto://$adv:$server_port"
  [[ $cluster == *"etcd-$host="* ]] || die "the initial cluster of $name ($cluster) does not name this member etcd-$host"
  local probe
  if [ "${S[TARGET_STORAGE]}" = etcd3 ]; then
    probe="exec /usr/local/bin/etcdctl --endpoints=$cproto://127.0.0.1:$port ${S[ETCDCTL_CERTS]} --command-timeout=15s endpoint health"
  else
    # The v2 API, with the target release's own etcdctl (etcd 2.x serves no v3); --endpoint is
    # the flag every v2 etcdctl knows (2.2.1 has no --endpoints).
    probe="ETCDCTL_API=2 exec /usr/local/bin/etcdctl-${S[TARGET_VERSION]} --endpoint $cproto://127.0.0.1:$port ${S[ETCDCTL_CERTS]} cluster-health"
  fi
  probe=${probe//  / }
  # Plain assignments, so that a bad value stops the render (set -e).
  local j_host j_adv j_hostip j_lcip j_cluster j_creds a_creds a_apicreds a_extra j_image j_root j_credsdir j_cpu j_probe
  j_host=$(json "$host"); j_adv=$(json "$adv"); j_hostip=$(json "${S[ETCD_HOST_IP]}")
  j_lcip=$(json "${S[ETCD_LISTEN_CLIENT_IP]}"); j_cluster=$(json "$cluster")
  j_creds=$(json "${S[ETCD_CREDS]}"); a_creds=$(json_args "${S[ETCD_CREDS]}" ETCD_CREDS)
  a_apicreds=$(json_args "${S[ETCD_APISERVER_CREDS]}" ETCD_APISERVER_CREDS); a_extra=$(json_args "${S[ETCD_EXTRA_ARGS]}" ETCD_EXTRA_ARGS)
  j_image=$(json "${S[ETCD_IMAGE]}"); j_root=$(json "${S[ETCD_DATA_ROOT]}")
  j_credsdir=$(json "${S[ETCD_CREDS_DIR]}"); j_cpu=$(json "$cpu"); j_probe=$(json "$probe")
  local j_snapdir j_snapcreds j_restore
  j_snapdir=$(json "$snapdir"); j_snapcreds=$(json "$snapshot_creds"); j_restore=$(json "$restore")
  declare -A V=(
    [hostname]=$j_host
    [advertise_host]=$j_adv
    [host_ip]=$j_hostip
    [listen_client_ip]=$j_lcip
    [etcd_protocol]=$pproto
    [etcd_apiserver_protocol]=$cproto
    [port]=$port
    [server_port]=$server_port
    [migrate_client_urls]=${migrate_port:+http://127.0.0.1:$migrate_port}
    [etcd_cluster]=$j_cluster
    [cluster_state]=${S[ETCD_CLUSTER_STATE]}
    [etcd_creds]=$j_creds
    [etcd_creds_args]=$a_creds
    [etcd_apiserver_creds_args]=$a_apicreds
    [etcd_extra_args]=$a_extra
    [target_version]=${S[TARGET_VERSION]}
    [target_storage]=${S[TARGET_STORAGE]}
    [image]=$j_image
    [data_root]=$j_root
    [creds_dir]=$j_credsdir
    [run_as_user]=${S[ETCD_RUN_AS_USER]}
    [run_as_group]=${S[ETCD_RUN_AS_GROUP]}
    [cpu_request]=$j_cpu
    [snapshot_count]=${S[ETCD_SNAPSHOT_COUNT]}
    [rejoin_if_empty]=${S[ETCD_REJOIN_IF_EMPTY]}
    [probe_command]=$j_probe
    [liveness_probe_initial_delay]=${S[ETCD_LIVENESS_INITIAL_DELAY]}
    [startup_failure_threshold]=${S[ETCD_STARTUP_FAILURE_THRESHOLD]}
    [termination_grace]=${S[ETCD_TERMINATION_GRACE]}
    [snapshot_mount]=$SNAPSHOT_MOUNT
    [snapshot_dir]=$j_snapdir
    [snapshot_every]=${S[ETCD_SNAPSHOT_EVERY]}
    [snapshot_keep]=${S[ETCD_SNAPSHOT_KEEP]}
    [snapshot_creds]=$j_snapcreds
    [restore_snapshot]=$j_restore
  )
  # Optional parts: {{#part}}...{{/part}} is kept (without the markers) when on, else dropped.
  local -A ON=(
    [sidecar]=${S[ETCD_SNAPSHOT_EVERY]:+1}
    [snapshots_mounted]=${S[ETCD_SNAPSHOT_EVERY]:+1}${restore:+1}
    [restore]=${restore:+1}
  )
  local part head rest
  text=$(<"$tpl")
  for part in "${!ON[@]}"; do
    while [[ $text == *"{{#$part}}"* ]]; do
      head=${text%%"{{#$part}}"*}
      rest=${text#*"{{#$part}}"}
      [[ $rest == *"{{/$part}}"* ]] || die "$tpl: {{#$part}} without {{/$part}}"
      if [ -n "${ON[$part]}" ]; then head+=${rest%%"{{/$part}}"*}; fi
      text=$head${rest#*"{{/$part}}"}
    done
  done
  for key in "${!V[@]}"; do
    val=${V[$key]}
    text=${text//"{{ $key }}"/"$val"}
  done
  if [[ $text =~ \{\{[^}]*\}\} ]]; then
    die "$tpl: no value for ${BASH_REMATCH[0]}"
  fi
  mkdir -p "$out"
  printf '%s\n' "$text" >"$out/.$name.manifest.tmp"
  mv -f "$out/.$name.manifest.tmp" "$dst"
  echo "rendered $dst: ${S[TARGET_VERSION]}/${S[TARGET_STORAGE]}, client port $port, peer port $server_port, migrate port ${migrate_port:-default}${ON[sidecar]:+, a snapshot every ${S[ETCD_SNAPSHOT_EVERY]} to $snapdir}${restore:+, restores $restore if the data dir is empty}"
}

case $only in
  '' | etcd) render etcd "${S[ETCD_CLIENT_PORT]}" "${S[ETCD_PEER_PORT]}" "${S[ETCD_MIGRATE_PORT]}" "${S[ETCD_INITIAL_CLUSTER]}" "${S[ETCD_CPU_REQUEST]}" \
    "${S[ETCD_SNAPSHOT_DIR]}" "${RESTORE_IN_POD[etcd]}" ;;&
  '' | etcd-events) render etcd-events "${S[ETCD_EVENTS_CLIENT_PORT]}" "${S[ETCD_EVENTS_PEER_PORT]}" "${S[ETCD_EVENTS_MIGRATE_PORT]}" "${S[ETCD_EVENTS_INITIAL_CLUSTER]}" "${S[ETCD_EVENTS_CPU_REQUEST]}" \
    "${S[ETCD_EVENTS_SNAPSHOT_DIR]}" "${RESTORE_IN_POD[etcd-events]}" ;;
  etcd) ;;
  *) die "--only $only: expected etcd or etcd-events" ;;
esac
