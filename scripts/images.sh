#!/usr/bin/env bash
# Builds the container images from what this machine has: no image is pulled. Binaries
# are compiled on the host, statically linked, and copied into the images.
#
#   flotilla-test/mcp-server:latest   the test MCP server (tests/mcp-server): tools echo
#                                     and add, /healthz switchable, EXIT_AFTER_MS/EXIT_CODE;
#                                     imported on its own (`docker import`), FROM scratch in effect
#   flotilla-agent:<version>          docker/agent.Dockerfile          } also :latest; FROM
#   flotilla-control-plane:<version>  docker/control-plane.Dockerfile  } debian:bookworm-slim,
#                                     made by scripts/base-image.sh when the engine lacks it
#
# <version> is the workspace's (Cargo.toml), the git revision goes into the OCI labels.
# FLOTILLA_IMAGE_PROFILE picks the cargo profile (dev; release for images you publish).
# Run as root on a machine without debian:bookworm-slim: debootstrap needs it.
set -euo pipefail
cd "$(dirname "$0")/.."

fail() { echo "images: $*" >&2; exit 1; }

TARGET=x86_64-unknown-linux-gnu
PROFILE=${FLOTILLA_IMAGE_PROFILE:-dev}
OUT=${CARGO_TARGET_DIR:-target}/$TARGET/$([ "$PROFILE" = dev ] && echo debug || echo "$PROFILE")
VERSION=$(sed -n '/^\[workspace\.package\]/,/^\[/ s/^version *= *"\([^"]*\)".*/\1/p' Cargo.toml)
[ -n "$VERSION" ] || fail "no version under [workspace.package] in Cargo.toml"
REVISION=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
START=$SECONDS

# --target keeps these statically linked artifacts apart from the host build's.
RUSTFLAGS="-C target-feature=+crt-static" \
  cargo build --locked -q --profile "$PROFILE" --target "$TARGET" \
  -p flotilla-test-mcp-server -p flotilla-agent -p flotilla-control-plane
echo "images: binaries built ($PROFILE) in $((SECONDS - START))s" >&2

import_image() { # name binary entrypoint-path
  local name=$1 binary=$2 path=$3 root
  root=$(mktemp -d)
  install -m 0755 "$binary" "$root$path"
  mkdir -p "$root/etc" "$root/tmp"
  printf 'root:x:0:0:root:/:/sbin/nologin\nnobody:x:65534:65534:nobody:/:/sbin/nologin\n' > "$root/etc/passwd"
  printf 'root:x:0:\nnogroup:x:65534:\n' > "$root/etc/group"
  tar -C "$root" -c . | docker import \
    -c "ENTRYPOINT [\"$path\"]" -c 'USER 65534' -c 'EXPOSE 8080' \
    -c 'LABEL org.opencontainers.image.source=flotilla' - "$name" >/dev/null
  rm -rf "$root"
  echo "images: $name ($(docker image inspect -f '{{.Size}}' "$name") bytes)" >&2
}

import_image flotilla-test/mcp-server:latest "$OUT/flotilla-test-mcp-server" /mcp-server

# The Dockerfiles copy the host's CA bundle rather than install ca-certificates: the build
# then needs no network. FLOTILLA_CA_BUNDLE names another file.
CA_BUNDLE=${FLOTILLA_CA_BUNDLE:-}
if [ -z "$CA_BUNDLE" ]; then
  for candidate in /etc/ssl/certs/ca-certificates.crt /etc/pki/tls/certs/ca-bundle.crt \
    /etc/ssl/ca-bundle.pem /etc/ssl/cert.pem; do
    if [ -s "$candidate" ]; then CA_BUNDLE=$candidate; break; fi
  done
fi
[ -s "$CA_BUNDLE" ] || fail "no CA bundle found (install ca-certificates, or set FLOTILLA_CA_BUNDLE)"
command -v strip >/dev/null || fail "strip is missing (install binutils)"

scripts/base-image.sh

CONTEXTS=$(mktemp -d)
trap 'rm -rf "$CONTEXTS"' EXIT

# The build context of each image is a directory of its own holding only what its
# Dockerfile copies: the binary, without its debug info (a dev binary shrinks to a third;
# symbols stay, so backtraces still name functions), the CA bundle, and any extra files.
build_image() { # name dockerfile binary extra-files...
  local name=$1 dockerfile=$2 binary=$3 context=$CONTEXTS/$1 old new started=$SECONDS
  shift 3
  mkdir "$context"
  install -m 0644 "$CA_BUNDLE" "$context/ca-certificates.crt"
  install -m 0755 "$binary" "$context/"
  strip --strip-debug "$context/$(basename "$binary")"
  for file in "$@"; do install -m 0755 "$file" "$context/"; done
  old=$(docker image inspect -f '{{.Id}}' "$name:$VERSION" 2>/dev/null || true)
  docker build -q -f "$dockerfile" --build-arg "VERSION=$VERSION" --build-arg "REVISION=$REVISION" \
    -t "$name:$VERSION" -t "$name:latest" "$context" >/dev/null || fail "building $name from $dockerfile failed"
  new=$(docker image inspect -f '{{.Id}}' "$name:$VERSION")
  # The previous build, now untagged, goes (unless a container still uses it).
  if [ -n "$old" ] && [ "$old" != "$new" ]; then docker image rm "$old" >/dev/null 2>&1 || true; fi
  echo "images: $name:$VERSION and :latest, revision $REVISION ($(docker image inspect -f '{{.Size}}' "$new") bytes, $((SECONDS - started))s)" >&2
}

build_image flotilla-agent docker/agent.Dockerfile "$OUT/flotilla-agent"
build_image flotilla-control-plane docker/control-plane.Dockerfile \
  "$OUT/flotilla-control-plane" docker/control-plane-healthcheck.sh
echo "images: done in $((SECONDS - START))s" >&2
