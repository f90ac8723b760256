#!/usr/bin/env bash
# Writes a small, deterministic Kubernetes-like key set to stdout, one key a line:
#   <key> TAB <ttl seconds, 0 = none> TAB <value (JSON, no tabs)>
# Namespaces, pods, services, configmaps and events (events carry a 1-hour TTL, as the API
# server writes them). registry-small.tsv is `gen-registry.sh 40`; a test keeps them equal.
#   gen-registry.sh [PODS_PER_NAMESPACE]
set -euo pipefail
pods=${1:-40}
namespaces=(default kube-system monitoring)
for ns in "${namespaces[@]}"; do
  printf '/registry/namespaces/%s\t0\t{"kind":"Namespace","apiVersion":"v1","metadata":{"name":"%s"}}\n' "$ns" "$ns"
done
for ns in "${namespaces[@]}"; do
  for ((i = 0; i < pods; i++)); do
    name=$(printf 'web-%04d' "$i")
    printf '/registry/pods/%s/%s\t0\t{"kind":"Pod","apiVersion":"v1","metadata":{"name":"%s","namespace":"%s","labels":{"app":"web","shard":"%d"}},"spec":{"nodeName":"node-%d","containers":[{"name":"web","image":"registry.local/web:1.%d"}]}}\n' \
      "$ns" "$name" "$name" "$ns" $((i % 4)) $((i % 7)) $((i % 3))
  done
  for ((i = 0; i < pods / 4; i++)); do
    printf '/registry/services/specs/%s/svc-%02d\t0\t{"kind":"Service","apiVersion":"v1","metadata":{"name":"svc-%02d","namespace":"%s"},"spec":{"ports":[{"port":%d}]}}\n' \
      "$ns" "$i" "$i" "$ns" $((8000 + i))
    printf '/registry/configmaps/%s/cm-%02d\t0\t{"kind":"ConfigMap","apiVersion":"v1","metadata":{"name":"cm-%02d","namespace":"%s"},"data":{"k":"v%d"}}\n' \
      "$ns" "$i" "$i" "$ns" "$i"
  done
  for ((i = 0; i < pods / 2; i++)); do
    printf '/registry/events/%s/web-%04d.%08x\t3600\t{"kind":"Event","apiVersion":"v1","metadata":{"name":"web-%04d.%08x","namespace":"%s"},"reason":"Scheduled","count":%d}\n' \
      "$ns" "$i" $((i * 2654435761 % 4294967296)) "$i" $((i * 2654435761 % 4294967296)) "$ns" $((i % 5 + 1))
  done
done
