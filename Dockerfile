# orcheo-gateway container image: built on the Rust image of the toolchain the crate
# targets, run on distroless (glibc, CA certificates, no shell) as a fixed non-root user.
#   docker build -t orcheo-gateway .
#   docker run --rm -p 8080:8080 -e ORCHEO_AUTH_JWT_SECRET=… orcheo-gateway

FROM rust:1.88-slim-bookworm AS build
WORKDIR /src
# Dependencies first, so that a source change does not rebuild them.
COPY Cargo.toml Cargo.lock ./
RUN mkdir -p src benches \
    && echo 'fn main() {}' > src/main.rs \
    && touch src/lib.rs \
    && for b in jwt ratelimit websocket tokens ext_authz; do echo 'fn main() {}' > "benches/$b.rs"; done \
    && cargo build --release --locked \
    && rm -rf src benches
COPY src ./src
COPY benches ./benches
RUN touch src/main.rs src/lib.rs \
    && cargo build --release --locked \
    && install -D -m 0755 target/release/orcheo-gateway /out/usr/local/bin/orcheo-gateway \
    && install -d -m 0750 /out/var/lib/orcheo-gateway \
    && install -d -m 0755 /out/etc/orcheo-gateway
COPY gateway.yaml /out/etc/orcheo-gateway/gateway.yaml

FROM gcr.io/distroless/cc-debian12:nonroot
# 65532 is distroless's `nonroot`; data and configuration belong to it, the root file
# system can be mounted read-only (only /var/lib/orcheo-gateway is written).
COPY --from=build --chown=65532:65532 /out/ /
USER 65532:65532
# The variable below names a file path, not a secret (DL3064 matches "TOKEN" in names).
# hadolint ignore=DL3064
ENV ORCHEO_GATEWAY_CONFIG=/etc/orcheo-gateway/gateway.yaml \
    ORCHEO_GATEWAY_LISTEN=0.0.0.0:8080 \
    ORCHEO_GATEWAY_ADMIN_LISTEN=0.0.0.0:8081 \
    ORCHEO_AUTH_SERVICE_TOKEN_DB_PATH=/var/lib/orcheo-gateway/service_tokens.sqlite
VOLUME ["/var/lib/orcheo-gateway"]
EXPOSE 8080 8081
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=5s --start-period=5s --retries=3 \
    CMD ["/usr/local/bin/orcheo-gateway", "healthcheck"]
ENTRYPOINT ["/usr/local/bin/orcheo-gateway"]
CMD ["serve"]
