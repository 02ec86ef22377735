# Every version the flake pins, as plain data: no nixpkgs needed to read it, so Debian's Nix
# evaluates it here (`nix eval .#lib.pins`) and a test compares it with this machine's toolchain.
{
  weirVersion = "0.1.0";

  # The eBPF programs need a nightly rustc (build-std=core for bpfel-unknown-none) and a
  # bpf-linker built against the same LLVM major as that rustc: they are pinned together.
  rust = {
    # rustc 1.97.0-nightly (e50aa6fba 2026-05-19), LLVM 22.1.4: the toolchain the project's
    # machines use; rust-overlay names nightlies by their release date.
    nightly = "2026-05-20";
    llvmMajor = 22;
  };
  bpfLinker = {
    version = "0.13.0";
    # crates.io's checksum of bpf-linker-0.13.0.crate (the one cargo verified when it
    # installed bpf-linker here), as an SRI hash.
    crateHash = "sha256-mYvqJQ0AmkcZ7RarbXctUZt3sDGgJh5pIjo1ATlyWUs=";
    features = [ "llvm-22" ];
  };

  # Kernels of the VM lab's matrix, as nixpkgs attribute names: the oldest LTS Weir supports
  # (5.10: clsact only, memlock-charged maps) up to the newest LTS (TCX, BTF everywhere).
  kernels = [
    { attr = "linuxPackages_5_10"; series = "5.10"; }
    { attr = "linuxPackages_5_15"; series = "5.15"; }
    { attr = "linuxPackages_6_1"; series = "6.1"; }
    { attr = "linuxPackages_6_6"; series = "6.6"; }
    { attr = "linuxPackages_6_12"; series = "6.12"; }
  ];

  # Modules the node images load: the cloud kernels keep these outside the image.
  nodeModules = [
    "virtio_pci" "virtio_net" "virtiofs" "veth" "vxlan" "ipip" "ip6_tunnel"
    "sch_ingress" "cls_bpf" "act_bpf" "nf_conntrack"
  ];
}
