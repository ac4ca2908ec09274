#!/bin/bash
# The control plane image's HEALTHCHECK, with nothing but bash (the image has no curl or
# openssl, and installing them would need a Debian mirror at build time and ~15 MB).
#
# It opens the fleet API port (FLOTILLA_API_LISTEN, an unspecified address meaning
# loopback) with bash's /dev/tcp and sends a TLS ClientHello:
#   - a TLS API (the default) must answer with a handshake record (a ServerHello): only a
#     control plane whose accept loop and TLS acceptor are serving does that, where a hung
#     process would still let the kernel accept the connection. The handshake is then
#     abandoned, so the control plane logs one `refused a connection` line (info) per check.
#   - a plaintext API (--api-plaintext) answers `HTTP/1.1 400`: then GET /healthz must
#     answer 200.
set -euo pipefail
export LC_ALL=C

listen=${FLOTILLA_API_LISTEN:-127.0.0.1:7080}
port=${listen##*:}
host=${listen%:*}
host=${host#[}
host=${host%]}
case $host in
  0.0.0.0 | '') host=127.0.0.1 ;;
  ::) host=::1 ;;
esac

unhealthy() { echo "unhealthy: $*"; exit 1; }

# 149 bytes: a TLS record holding a ClientHello for TLS 1.3 and 1.2 (TLS_AES_128_GCM_SHA256
# and the two ECDHE AES-128-GCM suites), SNI "localhost", groups x25519 and P-256,
# ECDSA P-256/RSA-PSS/RSA/Ed25519 signatures, and an x25519 key share (the curve's base
# point: any valid key will do, the handshake is never finished).
zeros() { printf '0%.0s' $(seq "$1"); }
hello=1603010090 # a handshake record of 144 bytes
hello+=0100008c0303$(zeros 64)00 # ClientHello, legacy version 1.2, random, no session id
hello+=00061301c02bc02f0100005d  # three cipher suites, no compression, 93 bytes of extensions
hello+=0000000e000c0000096c6f63616c686f7374 # server_name: localhost
hello+=000a00060004001d0017                 # supported_groups: x25519, secp256r1
hello+=000d000a00080403080404010807         # signature_algorithms
hello+=002b00050403040303                   # supported_versions: TLS 1.3, TLS 1.2
hello+=003300260024001d002009$(zeros 62) # key_share: x25519

escaped=
for ((i = 0; i < ${#hello}; i += 2)); do escaped+="\\x${hello:i:2}"; done

exec 3<>"/dev/tcp/$host/$port" || unhealthy "nothing listens on $host:$port"
printf '%b' "$escaped" >&3
reply=
IFS= read -r -t 3 -N 5 reply <&3 || true
exec 3<&-

case $reply in
  $'\x16'*) echo "ok: TLS on $host:$port"; exit 0 ;;
  HTTP/) ;;
  '') unhealthy "no answer from $host:$port" ;;
  *) unhealthy "$host:$port answered neither TLS nor HTTP" ;;
esac

exec 3<>"/dev/tcp/$host/$port" || unhealthy "nothing listens on $host:$port"
printf 'GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n' >&3
status=
IFS= read -r -t 3 status <&3 || true
exec 3<&-
case $status in
  "HTTP/1.1 200 "*) echo "ok: /healthz on $host:$port"; exit 0 ;;
  *) unhealthy "GET /healthz on $host:$port: ${status:-no answer}" ;;
esac
