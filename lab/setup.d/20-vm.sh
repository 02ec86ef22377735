# The VM lab (weir-lab --backend qemu, weir-lab matrix): guest workloads, virtiofsd, and the first
# download of QEMU and the default kernel. Sourced by lab/setup.sh; idempotent.

VM_APT_PACKAGES=(
  # Guest workloads copied into the node image with their libraries.
  qperf
  # Building virtiofsd from crates.io, fetching and unpacking Debian packages, module deps.
  libcap-ng-dev libseccomp-dev debian-archive-keyring xz-utils kmod
  # Shared libraries of QEMU 10 from bookworm-backports, which the lab unpacks with dpkg -x
  # (not installed, so apt does not pull these in): all of them are in plain bookworm.
  libaio1 libbpf1 libcapstone4 libfdt1 libfuse3-3 libglib2.0-0 libgmp10 libgnutls30 libibverbs1
  libjpeg62-turbo libnettle8 libnuma1 libpixman-1-0 libpmem1 libpng16-16 librdmacm1 libsasl2-2
  libseccomp2 libslirp0 libudev1 liburing2 libvdeplug2 libzstd1 zlib1g libcap-ng0
)
vm_need=()
for p in "${VM_APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || vm_need+=("$p")
done
if ((${#vm_need[@]})); then
  say "installing Debian packages for the VM lab: ${vm_need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq || say "apt-get update reported errors; installing anyway"
  apt-get install -y -qq --no-install-recommends "${vm_need[@]}" >/dev/null
else
  say "VM lab Debian packages present"
fi

# Debian bookworm's virtiofsd is too old for QEMU 10's vhost-user-fs and trixie's needs a newer
# glibc: build the crate (about 3 minutes, once).
if ! virtiofsd --version 2>/dev/null | grep -q '1\.14\.'; then
  say "building virtiofsd 1.14 from crates.io (about 3 minutes, once)"
  nice -n 10 cargo install virtiofsd --version '~1.14' --locked --quiet
else
  say "virtiofsd present"
fi

# The first download of QEMU 10 and of the kernel the test command boots (debian-6.1), so
# `lab/weir test` finds them cached. `weir-lab kernels fetch` verifies every package against
# Debian's index and reuses the cache from then on.
if ! compgen -G "${WEIR_CACHE_DIR:-$HOME/.cache/weir}/tools/qemu-*/usr/bin/qemu-system-x86_64" >/dev/null \
   || [ ! -e "${WEIR_CACHE_DIR:-$HOME/.cache/weir}/apt/resolved/bookworm_linux-image-cloud-amd64" ]; then
  say "fetching QEMU 10 and the debian-6.1 kernel into the cache (about 1 minute, once)"
  cargo build -q -p weir-lab
  target/debug/weir-lab kernels fetch debian-6.1
else
  say "QEMU and the debian-6.1 kernel cached"
fi
