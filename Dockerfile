# The agent as a container image: run it beside each app container (same network namespace,
# e.g. `network_mode: service:app` in compose) so that 127.0.0.1 reaches the app.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release -p grapevine-agent --bin agent

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/agent /usr/local/bin/agent
VOLUME /var/lib/grapevine
EXPOSE 7946/udp 7947/udp
ENTRYPOINT ["agent"]
CMD ["run"]
