# The Flotilla agent: one per droplet. Built by scripts/images.sh from a binary compiled
# on the host (statically linked), never from the repository: the build context is a
# directory the script fills with
#   flotilla-agent         the binary
#   ca-certificates.crt    the host's CA bundle (for --trust-system-roots), so the build
#                          installs no package and needs no network
# On a machine without a registry, scripts/base-image.sh makes debian:bookworm-slim from
# Debian's packages; elsewhere it is pulled.
FROM debian:bookworm-slim

COPY ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
COPY flotilla-agent /usr/local/bin/flotilla-agent

ARG VERSION
ARG REVISION=unknown
LABEL org.opencontainers.image.title="flotilla-agent" \
      org.opencontainers.image.description="The Flotilla agent: runs MCP servers on a droplet for the control plane" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.source="https://github.com/flotilla-dev/flotilla" \
      org.opencontainers.image.licenses="Apache-2.0"

# Root, on purpose: the agent drives the droplet's Docker engine through
# /var/run/docker.sock (mounted in), which is root's; whoever holds that socket is root on
# the host anyway, so a non-root user here would protect nothing.
USER root
# Its identity (identity.pem, ca.crt) and its command ledger: keep this volume across
# container replacements or the droplet must enroll again.
VOLUME /var/lib/flotilla-agent
# Healthy once enrolled: the same check the cloud-init user data and `byo` line use.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
  CMD ["test", "-s", "/var/lib/flotilla-agent/identity.pem"]
ENTRYPOINT ["/usr/local/bin/flotilla-agent"]
