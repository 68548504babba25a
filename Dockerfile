# One image with every paygate binary (billing, usage, gateway, paygatectl, demo-upstream); docker-compose.yml
# picks the one each service runs. The dependency layer is cached with cargo-chef, so editing our code does
# not rebuild the dependencies.
FROM rust:1.95-slim-bookworm AS chef
RUN cargo install --locked cargo-chef
WORKDIR /src

FROM chef AS planner
COPY . .
RUN cargo chef prepare --recipe-path recipe.json

FROM chef AS build
COPY --from=planner /src/recipe.json recipe.json
COPY rust-toolchain.toml ./
RUN cargo chef cook --release --recipe-path recipe.json
COPY . .
# SQL is checked against the committed .sqlx data (.cargo/config.toml sets SQLX_OFFLINE).
RUN cargo build --release --locked -p billing -p usage -p gateway -p paygatectl --bins \
 && mkdir /out \
 && cp target/release/billing target/release/usage target/release/gateway target/release/paygatectl \
       target/release/demo-upstream /out/

FROM debian:bookworm-slim
# ca-certificates: the system roots that https:// upstreams, rediss:// and sslmode=verify-full are checked
# against when no CA file is given.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/*
RUN useradd --system --uid 10001 --no-create-home paygate
COPY --from=build /out/ /usr/local/bin/
USER paygate
# gateway HTTP, billing gRPC (admin API included), usage gRPC, demo-upstream HTTP; then the /metrics ports
# of gateway, billing and usage.
EXPOSE 8080 50051 50052 9000 9100 9101 9102
# No ENTRYPOINT: the command is the binary to run (`billing`, `usage`, `paygatectl plans list`, ...), all on
# PATH. Healthchecks use `paygatectl health grpc|http`, so the image needs no shell tools for them.
CMD ["gateway"]
