# The Flotilla control plane. Built by scripts/images.sh from a binary compiled on the
# host (statically linked), never from the repository: the build context is a directory
# the script fills with
#   flotilla-control-plane          the binary
#   control-plane-healthcheck.sh    the HEALTHCHECK (bash only: the image has no curl)
#   ca-certificates.crt             the host's CA bundle (DigitalOcean's API, JWKS URLs),
#                                   so the build installs no package and needs no network
# On a machine without a registry, scripts/base-image.sh makes debian:bookworm-slim from
# Debian's packages; elsewhere it is pulled.
FROM debian:bookworm-slim

# A fixed uid, so a data volume or bind mount can be owned by it ahead of time.
RUN groupadd --system --gid 10001 flotilla \
 && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/flotilla --no-create-home \
      --shell /usr/sbin/nologin flotilla \
 && install -d -o 10001 -g 10001 -m 0700 /var/lib/flotilla

COPY ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
COPY control-plane-healthcheck.sh /usr/local/bin/flotilla-healthcheck
COPY flotilla-control-plane /usr/local/bin/flotilla-control-plane

ARG VERSION
ARG REVISION=unknown
LABEL org.opencontainers.image.title="flotilla-control-plane" \
      org.opencontainers.image.description="The Flotilla control plane: the fleet API and the agents' mTLS endpoint" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.source="https://github.com/flotilla-dev/flotilla" \
      org.opencontainers.image.licenses="Apache-2.0"

# The API listens on every address inside the container (its default, loopback, could not
# be published). It still needs an API key per call, and TLS unless --api-plaintext.
ENV FLOTILLA_DATA_DIR=/var/lib/flotilla \
    FLOTILLA_API_LISTEN=0.0.0.0:7080
USER 10001:10001
# The server certificate, the trust bundle and the replica id: all regenerated when lost.
# (The master key file is here too when no FLOTILLA_MASTER_KEY is given: give one.)
VOLUME /var/lib/flotilla
# agents (mTLS), enrollment, the fleet API
EXPOSE 7443 7444 7080
HEALTHCHECK --interval=30s --timeout=10s --start-period=30s --retries=3 \
  CMD ["/usr/local/bin/flotilla-healthcheck"]
ENTRYPOINT ["/usr/local/bin/flotilla-control-plane"]
CMD ["serve"]
