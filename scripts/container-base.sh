#!/usr/bin/env bash
# Make a local Debian bookworm base image (python3 3.11 + venv) for podman builds on machines that
# cannot pull images. Does nothing when the image already exists. Needs root and debootstrap.
#
#   scripts/container-base.sh [IMAGE]        default IMAGE: localhost/gradserve-base:bookworm
#   DEBIAN_MIRROR=http://mirror/debian scripts/container-base.sh
set -euo pipefail

image="${1:-localhost/gradserve-base:bookworm}"
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"

if podman image exists "$image"; then
    echo "base image $image exists"
    exit 0
fi
if ! command -v debootstrap >/dev/null; then
    echo "debootstrap is missing: apt-get install -y debootstrap" >&2
    exit 1
fi

root="$(mktemp -d)"
trap 'rm -rf "$root"' EXIT
# python3-venv brings ensurepip, so `python3 -m venv` gives the venv its own pip.
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    bookworm "$root" "$mirror"
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
tar -C "$root" -c . | podman import --change 'CMD ["/bin/bash"]' - "$image"
echo "built base image $image"
