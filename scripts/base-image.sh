#!/usr/bin/env bash
# Makes `debian:bookworm-slim` on this machine's Docker engine when it does not have it,
# from Debian's own packages, so Dockerfiles that say `FROM debian:bookworm-slim` build
# where no image registry is reachable (only Debian's mirror). Where the engine already
# has the image (pulled from Docker Hub, or made by an earlier run) it does nothing.
#
#   debootstrap --variant=minbase bookworm, trimmed the way the official slim image is
#   (no apt lists, docs, man pages or locales; dpkg keeps them out of later installs too),
#   then `docker import`ed with CMD ["bash"] and the usual PATH.
#
# Needs root (debootstrap chroots and makes device nodes); installs debootstrap from apt
# when it is missing. FLOTILLA_DEBIAN_MIRROR overrides the mirror.
set -euo pipefail

IMAGE=debian:bookworm-slim
SUITE=bookworm
MIRROR=${FLOTILLA_DEBIAN_MIRROR:-http://deb.debian.org/debian}

fail() { echo "base-image: $*" >&2; exit 1; }

docker version --format '{{.Server.Version}}' >/dev/null 2>&1 || fail "no Docker engine answers on this machine"
if docker image inspect "$IMAGE" >/dev/null 2>&1; then
  echo "base-image: $IMAGE is present; nothing to do" >&2
  exit 0
fi

[ "$(id -u)" -eq 0 ] || fail "$IMAGE is missing and debootstrap needs root: run this script as root (or pull $IMAGE)"
if ! command -v debootstrap >/dev/null; then
  echo "base-image: installing debootstrap from Debian's packages" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2 && apt-get install -y -qq debootstrap >&2
  command -v debootstrap >/dev/null || fail "debootstrap is still missing after installing it"
fi

START=$SECONDS
ROOT=$(mktemp -d /var/tmp/flotilla-base.XXXXXX)
LOG=$(mktemp /var/tmp/flotilla-base-log.XXXXXX)
cleanup() {
  # A failed debootstrap can leave /proc or /sys mounted inside the tree: unmount them
  # before removing it, and never cross into another file system.
  local mounts
  mounts=$(awk -v root="$ROOT/" 'index($2, root) == 1 { print $2 }' /proc/mounts | sort -r)
  for mount in $mounts; do umount -l "$mount" || true; done
  rm -rf --one-file-system "$ROOT"
  rm -f "$LOG"
}
trap cleanup EXIT

echo "base-image: debootstrap --variant=minbase $SUITE from $MIRROR (a few minutes)" >&2
if ! debootstrap --variant=minbase "$SUITE" "$ROOT" "$MIRROR" >"$LOG" 2>&1; then
  tail -n 20 "$LOG" >&2
  if [ -f "$ROOT/debootstrap/debootstrap.log" ]; then tail -n 20 "$ROOT/debootstrap/debootstrap.log" >&2; fi
  fail "debootstrap failed (is $MIRROR reachable?)"
fi

# The same sources as the official image: the suite, its updates and security.
rm -f "$ROOT/etc/apt/sources.list"
cat >"$ROOT/etc/apt/sources.list.d/debian.sources" <<EOF
Types: deb
URIs: http://deb.debian.org/debian
Suites: $SUITE $SUITE-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://deb.debian.org/debian-security
Suites: $SUITE-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF

# What the official slim image tells dpkg and apt, so packages installed later stay slim.
cat >"$ROOT/etc/dpkg/dpkg.cfg.d/docker" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
path-exclude /usr/share/lintian/*
path-exclude /usr/share/linda/*
EOF
cat >"$ROOT/etc/apt/apt.conf.d/docker-clean" <<'EOF'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
EOF
printf 'Acquire::Languages "none";\n' >"$ROOT/etc/apt/apt.conf.d/docker-no-languages"
printf 'Apt::AutoRemove::SuggestsImportant "false";\n' >"$ROOT/etc/apt/apt.conf.d/docker-autoremove-suggests"

# Trim: apt lists and caches, docs (but their copyright files), man pages, locales, logs.
find "$ROOT/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete
find "$ROOT/usr/share/doc" -mindepth 1 -type d -empty -delete
find "$ROOT/usr/share/locale" -mindepth 1 -maxdepth 1 -not -name locale.alias -exec rm -rf {} +
rm -rf "$ROOT"/usr/share/{man,groff,info,lintian,linda}/* \
  "$ROOT"/var/lib/apt/lists/* "$ROOT"/var/cache/apt/*.bin "$ROOT"/var/cache/apt/archives/*.deb \
  "$ROOT"/var/cache/debconf/*-old "$ROOT"/var/lib/dpkg/*-old "$ROOT"/var/log/*.log \
  "$ROOT"/var/log/apt/* "$ROOT/debootstrap"
# The engine provides these per container; keep nothing of this host's.
: >"$ROOT/etc/resolv.conf"
: >"$ROOT/etc/machine-id"
echo localhost >"$ROOT/etc/hostname"
rm -f "$ROOT/var/lib/dbus/machine-id"

echo "base-image: importing $IMAGE ($(du -sh --one-file-system "$ROOT" | cut -f1))" >&2
tar --numeric-owner --one-file-system -C "$ROOT" -c . | docker import \
  -m "debootstrap --variant=minbase $SUITE $MIRROR (Flotilla scripts/base-image.sh)" \
  -c 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  -c 'CMD ["bash"]' - "$IMAGE" >/dev/null
docker run --rm "$IMAGE" true || fail "the imported $IMAGE does not run"
echo "base-image: $IMAGE built in $((SECONDS - START))s ($(docker image inspect -f '{{.Size}}' "$IMAGE") bytes)" >&2
