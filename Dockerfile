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
RUN useradd --system --uid 10001 --no-create-home paygate
COPY --from=build /out/ /usr/local/bin/
USER paygate
