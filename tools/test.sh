#!/usr/bin/env bash
# The whole test suite, on a fresh Debian/Ubuntu machine.
#
# As root it first installs the packages the end-to-end tests drive (wireguard-go,
# wireguard-tools, OpenSSH, iproute2, curl, openssl, Prometheus' promtool, iperf3,
# systemd-analyze, nftables and tinyproxy for the tests of devices on networks that block UDP,
# PostgreSQL 15 for the registry and cluster tests, which start throwaway
# servers of their own). The e2e tests need root (network namespaces, TUN devices): run as
# another user, they fail and say why.
set -euo pipefail
cd "$(dirname "$0")/.."

PACKAGES=(wireguard-go wireguard-tools openssh-server openssh-client iproute2 curl openssl iputils-ping prometheus iperf3 systemd procps util-linux postgresql nftables tinyproxy)

if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    missing=()
    for p in "${PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        echo "installing: ${missing[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
fi

# The e2e tests run the real binaries; build them first.
cargo build --workspace --bins --locked
cargo test --workspace --locked -- "$@"
