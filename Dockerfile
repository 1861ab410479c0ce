# Multi-stage build: compile with the Rust toolchain, run on a small distroless image as non-root.
FROM rust:1-bookworm AS build
WORKDIR /src
# Everything Cargo.toml names: the sources and the bench it declares (cargo refuses a manifest
# whose targets are missing). CI builds exactly this context: scripts/check-image-context.py.
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY benches ./benches
RUN cargo build --release --locked --bin tokengate

# glibc and libgcc only; no shell, no package manager. TLS roots are compiled in (webpki-roots).
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/tokengate /usr/local/bin/tokengate
USER nonroot:nonroot
EXPOSE 8080 9901
ENTRYPOINT ["/usr/local/bin/tokengate"]
CMD ["run", "--config", "/etc/tokengate/proxy.toml"]
