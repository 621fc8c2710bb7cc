# syntax=docker/dockerfile:1
# twill image: twilld and the CNI plugins. Build from the repository root:
#   docker build -t twill:0.1.0 .
# The DaemonSet's init container runs `twilld install-cni`, which copies /opt/twill/bin/* to the
# node's /opt/cni/bin (twill-loopback also as loopback, only when the node has none);
# the main container runs twilld.

ARG RUST_VERSION=1.95
ARG DEBIAN_RELEASE=bookworm

FROM rust:${RUST_VERSION}-${DEBIAN_RELEASE} AS build
# protoc: etcd-client generates its gRPC code at build time; its protos import
# google/protobuf/*.proto, which only libprotobuf-dev ships (not a dependency of
# protobuf-compiler, and recommends are off here).
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      protobuf-compiler libprotobuf-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# Cache mounts keep the registry and target dir between builds; the binaries are copied out
# in the same step because cache mounts are not part of the image.
# The plugins run on the node, not in this image, so they are linked statically (crt-static):
# a node with an older glibc than bookworm's still runs them. twilld runs in the image and
# stays dynamic. --target keeps RUSTFLAGS away from build scripts and proc-macros.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p twilld --bins \
 && host="$(rustc -vV | sed -n 's/^host: //p')" \
 && RUSTFLAGS="-C target-feature=+crt-static" \
    cargo build --release --locked --target "$host" -p twill-plugins --bins \
 && mkdir -p /out/bin /out/cni \
 && cp target/release/twilld /out/bin/ \
 && for p in twill twill-bridge twill-host-local twill-loopback twill-portmap; do \
      cp "target/$host/release/$p" /out/cni/; \
    done

FROM debian:${DEBIAN_RELEASE}-slim
# nft: twilld installs its masquerade rules with `nft -f -`. iptables (iptables-nft,
# iptables-legacy and their -save tools): where a host's filter FORWARD drops (Docker), the
# TWILL-FWD accept chain goes into whichever backend holds that drop. Nothing else is needed:
# links, addresses, routes, neighbours and FDB entries are programmed over netlink.
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends nftables iptables \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /out/bin/twilld /usr/local/bin/twilld
COPY --from=build /out/cni/ /opt/twill/bin/
LABEL org.opencontainers.image.title="twill" \
      org.opencontainers.image.description="twilld and the twill CNI plugins" \
      org.opencontainers.image.licenses="Apache-2.0"
ENTRYPOINT ["/usr/local/bin/twilld"]
