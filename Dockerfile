# relay's container image.
#
#   docker build -t relay .                      # compiles relay in a Rust builder stage
#   cargo build --release && \
#   docker build --build-arg BINARY=prebuilt -t relay .   # copies target/release/relay instead
#
# The base images come in as build arguments (a mirror, a pinned digest, distroless `cc`…).
# BuildKit is needed (the default builder of Docker 23 and later; DOCKER_BUILDKIT=1 before):
# it builds only the stages the final one uses, so BINARY=prebuilt never needs RUST_IMAGE.

ARG RUST_IMAGE=rust:1-bookworm
ARG RUNTIME_IMAGE=debian:bookworm-slim
# `build` compiles relay here; `prebuilt` copies PREBUILT_PATH from the build context (a binary
# built for the runtime image's glibc: Debian 12 or older).
ARG BINARY=build

FROM ${RUST_IMAGE} AS build
WORKDIR /src
# The dependencies first, in a layer of their own: it is rebuilt only when Cargo.toml or
# Cargo.lock change, not at every change of relay's own code.
COPY Cargo.toml Cargo.lock ./
RUN mkdir src \
    && echo 'fn main() {}' > src/main.rs \
    && touch src/lib.rs \
    && cargo build --release --locked \
    && rm -rf src
COPY . .
# COPY keeps the sources' times, which may be older than the stand-in's build: touch them so
# that cargo rebuilds relay itself.
RUN touch src/main.rs src/lib.rs \
    && cargo build --release --locked --bin relay \
    && cp target/release/relay /relay

FROM scratch AS prebuilt
ARG PREBUILT_PATH=target/release/relay
COPY ${PREBUILT_PATH} /relay

# The stage named by BINARY.
FROM ${BINARY} AS binary

FROM ${RUNTIME_IMAGE} AS runtime
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="relay" \
      org.opencontainers.image.description="An OpenAI API relay: users, JWTs, streaming chat, shared rate limits." \
      org.opencontainers.image.licenses="MIT" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}"
# CA roots for an https upstream; a user of its own (fixed ids, so that volumes and secret files
# can be given to it), whose home holds the SQLite database when DATABASE_URL is left alone.
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 relay \
    && useradd --system --uid 10001 --gid relay --home-dir /var/lib/relay --shell /usr/sbin/nologin relay \
    && mkdir -p /var/lib/relay \
    && chown relay:relay /var/lib/relay
COPY --from=binary /relay /usr/local/bin/relay
WORKDIR /var/lib/relay
ENV HOST=0.0.0.0 \
    PORT=8000
USER 10001:10001
EXPOSE 8000
# relay drains on SIGTERM (in-flight requests and streams get SHUTDOWN_GRACE_SECONDS, 30 by
# default): give `docker stop` a longer timeout than that (`-t 35`, compose `stop_grace_period`).
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=3 \
    CMD ["relay", "health", "--timeout", "3"]
ENTRYPOINT ["relay"]
CMD ["serve"]
