# drover as a container, the way docker-loadbalancer's users run their load balancer:
#
#   docker build -t drover .
#   docker run -d --name lb --net host -v /var/run/docker.sock:/var/run/docker.sock drover
#
# The default command watches the Docker Engine (`drover run --docker`). Where no registry is
# reachable, scripts/docker-image.sh builds an equivalent image from a local binary.

FROM rust:1-slim-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin drover \
 && install -D -m 0755 target/release/drover /out/drover

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /out/drover /usr/local/bin/drover
# State made through the management API.
WORKDIR /var/lib/drover
ENTRYPOINT ["/usr/local/bin/drover"]
CMD ["run", "--docker", "--data-dir", "/var/lib/drover"]
