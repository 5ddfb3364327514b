# A container image for portshift: built in a Rust image, run from a slim
# Debian one as a non-root user, with the binary and the shipped files
# only. The config is expected at /etc/portshift/portshift.toml: mount
# your own over the example, which listens on loopback only, so that its
# listeners bind 0.0.0.0 inside the container.
#
#   docker build -t portshift .
#   docker run --rm -p 8080:8080 -v $PWD/portshift.toml:/etc/portshift/portshift.toml:ro portshift

FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked \
 && target/release/portshift man --dir /out/man \
 && install -D target/release/portshift /out/portshift

FROM debian:bookworm-slim
RUN useradd --system --no-create-home --shell /usr/sbin/nologin portshift \
 && mkdir -p /var/lib/portshift && chown portshift /var/lib/portshift
COPY --from=build /out/portshift /usr/bin/portshift
COPY --from=build /out/man/ /usr/share/man/man1/
COPY policies/ /usr/share/portshift/policies/
COPY dashboards/ /usr/share/portshift/dashboards/
COPY examples/portshift.toml /etc/portshift/portshift.toml
USER portshift
WORKDIR /var/lib/portshift
EXPOSE 8080 9900
ENTRYPOINT ["/usr/bin/portshift"]
CMD ["run", "-c", "/etc/portshift/portshift.toml"]
