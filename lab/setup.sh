#!/usr/bin/env bash
# Installs what Weir's build, tests and namespace lab need on a fresh Debian 12 machine.
# Idempotent: every step checks first and says what it does. Sourced by lab/weir.
set -euo pipefail

say() { printf '\033[1m[setup]\033[0m %s\n' "$*" >&2; }

APT_PACKAGES=(
  # eBPF toolchain: bpf-linker links against LLVM 22.
  llvm-22-dev clang-22 libpolly-22-dev libzstd-dev zlib1g-dev
  # Lab workloads and plumbing (real parts, no mocks).
  iproute2 nginx-light curl iperf3 socat iptables nftables ethtool procps util-linux
  # `weir-lab bench policy`'s baseline: NetworkPolicy as iptables rules over ipsets.
  ipset
)

need_apt=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || need_apt+=("$p")
done
if ((${#need_apt[@]})); then
  say "installing Debian packages: ${need_apt[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq || say "apt-get update reported errors (an unreachable extra source?); installing anyway"
  apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
  # nginx from the package starts a system instance we do not want: the lab runs its own, by PID.
  if command -v systemctl >/dev/null && systemctl is-active -q nginx 2>/dev/null; then systemctl stop nginx || true; fi
else
  say "Debian packages present"
fi

export PATH="$HOME/.cargo/bin:$PATH"
if ! rustup toolchain list | grep -q '^nightly'; then
  say "installing the nightly Rust toolchain (eBPF programs need build-std)"
  rustup toolchain install nightly --profile minimal
fi
if ! rustup component list --toolchain nightly --installed | grep -q '^rust-src'; then
  say "adding rust-src to nightly"
  rustup component add rust-src --toolchain nightly
fi

if ! bpf-linker --version 2>/dev/null | grep -q '0\.13\.0'; then
  say "building bpf-linker 0.13.0 against LLVM 22 (about 3 minutes, once)"
  LLVM_PREFIX=/usr/lib/llvm-22 cargo install bpf-linker --version 0.13.0 \
    --no-default-features --features llvm-22 --locked
else
  say "bpf-linker 0.13.0 present"
fi

# Parts that only some features need (VM lab, containers, ...) keep their own idempotent steps,
# one file each, so they can grow without touching this one.
for part in "$(dirname "${BASH_SOURCE[0]}")"/setup.d/*.sh; do
  [ -e "$part" ] || continue
  # shellcheck source=/dev/null
  . "$part"
done
