#!/usr/bin/env bash
# `make image`: builds images/etcd/Dockerfile with whichever engine works here: docker (when its
# daemon answers), podman, or buildah (chroot isolation, vfs storage: no daemon, no privileges
# beyond root). PARTS=local (default) copies .rootfs/ (`make rootfs`) into a FROM scratch image and
# needs no registry; PARTS=official builds etcd-migrate and fetches the etcd releases.
#   IMAGE   tag (default localhost/etcd-migrate:<newest etcd in the image>-0)
#   PARTS   local | official
#   ENGINE  docker | podman | buildah (default: the first that works)
#   OCI_ARCHIVE  also export the image to this oci-archive file (buildah/podman)
#   PLATFORMS    e.g. linux/amd64,linux/arm64 (PARTS=official; docker buildx or buildah --platform)
set -euo pipefail
cd "$(dirname "$0")/.."
parts=${PARTS:-local}
case $parts in local | official) ;; *) echo "image: PARTS=$parts: expected local or official" >&2; exit 2 ;; esac

if [ "$parts" = local ]; then
  [ -x .rootfs/usr/local/bin/etcd-migrate ] || { echo "image: no .rootfs; run 'make rootfs' first" >&2; exit 1; }
  newest=$(readlink .rootfs/usr/local/bin/etcd); newest=${newest#etcd-}
else
  newest=$(sed -n 's/^official .* \([0-9.]*\)$/\1/p' images/etcd/versions)
fi
image=${IMAGE:-localhost/etcd-migrate:$newest-0}

engine=${ENGINE:-}
if [ -z "$engine" ]; then
  if command -v docker >/dev/null && docker info >/dev/null 2>&1; then engine=docker
  elif command -v podman >/dev/null; then engine=podman
  elif command -v buildah >/dev/null; then engine=buildah
  else echo "image: no docker daemon, podman or buildah here; 'make image-deps' installs buildah" >&2; exit 1
  fi
fi
args=(-f images/etcd/Dockerfile --build-arg "PARTS=$parts" -t "$image")
[ -n "${PLATFORMS:-}" ] && args+=(--platform "$PLATFORMS")
echo "image: building $image (PARTS=$parts) with $engine"
case $engine in
  docker)
    if [ -n "${PLATFORMS:-}" ]; then docker buildx build "${args[@]}" .; else docker build "${args[@]}" .; fi ;;
  podman) podman build --isolation chroot "${args[@]}" . ;;
  buildah) buildah --storage-driver "${STORAGE_DRIVER:-vfs}" bud --isolation chroot "${args[@]}" . ;;
  *) echo "image: ENGINE=$engine: expected docker, podman or buildah" >&2; exit 2 ;;
esac
if [ -n "${OCI_ARCHIVE:-}" ]; then
  case $engine in
    buildah) buildah --storage-driver "${STORAGE_DRIVER:-vfs}" push "$image" "oci-archive:$OCI_ARCHIVE" ;;
    podman) podman save --format oci-archive -o "$OCI_ARCHIVE" "$image" ;;
    docker) docker save -o "$OCI_ARCHIVE" "$image" ;;
  esac
  echo "image: exported to $OCI_ARCHIVE"
fi
echo "image: $image"
