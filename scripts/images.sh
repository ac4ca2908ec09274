#!/usr/bin/env bash
# Builds the container images the tests need from what this machine has: no image is
# pulled. Binaries are compiled on the host, statically linked, and imported into an
# image of their own (`docker import`), so the images are FROM scratch in effect.
#
#   flotilla-test/mcp-server:latest   the test MCP server (tests/mcp-server): tools echo
#                                     and add, /healthz switchable, EXIT_AFTER_MS/EXIT_CODE
set -euo pipefail
cd "$(dirname "$0")/.."

TARGET=x86_64-unknown-linux-gnu
PROFILE=${FLOTILLA_IMAGE_PROFILE:-dev}
OUT=target/$TARGET/$([ "$PROFILE" = dev ] && echo debug || echo "$PROFILE")

# --target keeps these statically linked artifacts apart from the host build's.
RUSTFLAGS="-C target-feature=+crt-static" \
  cargo build --locked -q --profile "$PROFILE" --target "$TARGET" -p flotilla-test-mcp-server

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
