#!/usr/bin/env bash
# A Debian 12 base with Python 3.11, for machines where no registry answers and python:3.11-slim
# cannot be pulled: debootstrap from the Debian package mirror, trimmed of what an image never uses
# (package caches and lists, documentation, man pages, translations), imported as image $1.
# Needs root and debootstrap. DEBIAN_MIRROR chooses the mirror (default: debootstrap's own).
set -euo pipefail
tag="$1"
[ "$(id -u)" = 0 ] || { echo "make image: building a Debian base needs root (debootstrap); set PYTHON_IMAGE to a Python 3.11 image instead" >&2; exit 2; }
command -v debootstrap >/dev/null 2>&1 || { echo "make image: debootstrap is missing (apt-get install debootstrap), or set PYTHON_IMAGE to a Python 3.11 image" >&2; exit 2; }
root="$(mktemp -d)"
trap 'rm -rf "$root"' EXIT
debootstrap --variant=minbase --include=python3,python3-venv,python-is-python3 \
  bookworm "$root" ${DEBIAN_MIRROR:+"$DEBIAN_MIRROR"} >/dev/null
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* "$root"/usr/share/doc/* \
  "$root"/usr/share/man/* "$root"/usr/share/locale/* "$root"/usr/share/info/*
chmod 755 "$root"  # mktemp made it 0700: the image's / would shut out every user but root
tar -C "$root" -c . | podman --storage-driver "${STORAGE_DRIVER:-vfs}" import -q \
  --change 'CMD ["python3"]' --change 'ENV LANG=C.UTF-8' - "$tag" >/dev/null
echo "make image: base $tag: Debian 12 minbase with $(chroot "$root" python3 --version)" >&2
