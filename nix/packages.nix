# The parts of the flake that need nixpkgs: the pinned toolchain, bpf-linker, the workspace
# binaries (agent with its eBPF objects, lab, image builder), the OCI image, kernels and node
# images for the VM lab's matrix, and the dev shell.
#
# NOT BUILT OR EVALUATED WHERE WEIR IS DEVELOPED: nixpkgs cannot be fetched there (see the
# README's Nix section). Written against nixpkgs' documented interfaces (makeRustPlatform,
# buildRustPackage, importCargoLock, dockerTools.streamLayeredImage, makeModulesClosure,
# makeInitrdNG); treat every line here as unverified until a machine with nixpkgs builds it.
{ pkgs, pins, src }:
let
  inherit (pkgs) lib;

  # One nightly for the host crates and the eBPF crate: aya-build runs the same `cargo` (there
  # is no rustup in the sandbox) with `-Z build-std=core` for bpfel-unknown-none.
  toolchain = pkgs.rust-bin.nightly.${pins.rust.nightly}.minimal.override {
    extensions = [ "rust-src" "clippy" "rustfmt" ];
  };
  rustPlatform = pkgs.makeRustPlatform {
    cargo = toolchain;
    rustc = toolchain;
  };
  llvm = pkgs."llvmPackages_${toString pins.rust.llvmMajor}";
  llvmSysPrefix = "LLVM_SYS_${toString pins.rust.llvmMajor}1_PREFIX";

  # bpf-linker from its crates.io release, linked against the nightly's LLVM major.
  bpf-linker = rustPlatform.buildRustPackage ({
    pname = "bpf-linker";
    version = pins.bpfLinker.version;
    src = pkgs.fetchurl {
      name = "bpf-linker-${pins.bpfLinker.version}.tar.gz";
      url = "https://static.crates.io/crates/bpf-linker/bpf-linker-${pins.bpfLinker.version}.crate";
      hash = pins.bpfLinker.crateHash;
    };
    # The crate's own Cargo.lock, copied into the repository so no hash of a vendor directory
    # has to be computed where crates.io is unreachable.
    cargoLock.lockFile = ./bpf-linker/Cargo.lock;
    buildNoDefaultFeatures = true;
    buildFeatures = pins.bpfLinker.features;
    nativeBuildInputs = [ llvm.llvm.dev ];
    buildInputs = [ llvm.llvm pkgs.zlib pkgs.zstd pkgs.libxml2 pkgs.ncurses ];
    LLVM_PREFIX = "${llvm.llvm.dev}";
    doCheck = false;
  } // { ${llvmSysPrefix} = "${llvm.llvm.dev}"; });

  # Offline crates for the workspace and for the standard library that build-std compiles: the
  # nested eBPF build resolves library/Cargo.lock through the same vendored source.
  stdLockFile = "${toolchain}/lib/rustlib/src/rust/library/Cargo.lock";
  vendor = pkgs.symlinkJoin {
    name = "weir-vendor";
    paths = [
      (rustPlatform.importCargoLock { lockFile = src + "/Cargo.lock"; })
      (rustPlatform.importCargoLock { lockFile = stdLockFile; })
    ];
  };

  hasNodeImageCrate = builtins.pathExists (src + "/images/node/Cargo.toml");
  workspacePackages = [ "weir-agent" "weir-lab" "weir-oci" ]
    ++ lib.optional hasNodeImageCrate "weir-node-image";

  # Every workspace binary in one build (they share most dependencies).
  workspace = rustPlatform.buildRustPackage {
    pname = "weir";
    version = pins.weirVersion;
    inherit src;
    cargoDeps = vendor;
    cargoBuildFlags = lib.concatMap (p: [ "-p" p ]) workspacePackages;
    nativeBuildInputs = [ bpf-linker ];
    # The tests load BPF programs and make namespaces: they need root and run in `lab/weir test`.
    doCheck = false;
  };

  agent = pkgs.runCommand "weir-agent-${pins.weirVersion}" { } ''
    install -Dm755 ${workspace}/bin/weir-agent $out/bin/weir-agent
  '';

  weir-image = pkgs.runCommand "weir-image-${pins.weirVersion}" { } ''
    install -Dm755 ${workspace}/bin/weir-image $out/bin/weir-image
  '';

  # What lab/setup.sh installs on Debian, from nixpkgs.
  labTools = with pkgs; [
    iproute2 nginx curl iperf3 socat iptables nftables ethtool procps util-linux qemu
  ];
  lab = pkgs.runCommand "weir-lab-${pins.weirVersion}" { nativeBuildInputs = [ pkgs.makeWrapper ]; } ''
    # weir-lab runs the weir-agent next to its own executable.
    makeWrapper ${workspace}/bin/weir-lab $out/bin/weir-lab \
      --prefix PATH : ${lib.makeBinPath labTools}
  '';

  oci-image = pkgs.dockerTools.streamLayeredImage {
    name = "weir/agent";
    tag = pins.weirVersion;
    contents = [ agent ];
    config = {
      Entrypoint = [ "${agent}/bin/weir-agent" ];
      Cmd = [ "run" "--config" "/etc/weir/config.toml" ];
      User = "0:0";
      ExposedPorts = { "9464/tcp" = { }; };
      Labels = {
        "org.opencontainers.image.title" = "weir-agent";
        "org.opencontainers.image.version" = pins.weirVersion;
      };
    };
  };

  kernel = k: pkgs.${k.attr}.kernel;

  # A VM node for the lab: the kernel, and an initramfs with the node's init (weir-node-init,
  # when the workspace has the node image crate), the workloads and the kernel's modules.
  nodeImage = k:
    let
      kern = kernel k;
      modules = pkgs.makeModulesClosure {
        kernel = kern;
        firmware = pkgs.runCommand "no-firmware" { } "mkdir -p $out/lib/firmware";
        rootModules = pins.nodeModules;
        allowMissing = true;
      };
      init =
        if hasNodeImageCrate
        then "${workspace}/bin/weir-node-init"
        else "${pkgs.pkgsStatic.busybox}/bin/sh";
      initrd = pkgs.makeInitrdNG {
        name = "weir-node-initrd-${k.series}";
        contents = [
          { source = init; target = "/init"; }
          { source = "${modules}/lib/modules"; target = "/lib/modules"; }
          { source = "${pkgs.pkgsStatic.busybox}/bin/busybox"; target = "/bin/busybox"; }
        ] ++ map (tool: { source = "${tool}/bin"; target = "/usr/local/${tool.pname or tool.name}/bin"; })
          [ pkgs.iproute2 pkgs.nginx pkgs.iperf3 pkgs.socat pkgs.curl pkgs.qperf ];
      };
    in
    pkgs.runCommand "weir-node-image-${k.series}" { } ''
      mkdir -p $out
      ln -s ${kern}/bzImage $out/bzImage
      ln -s ${initrd}/initrd $out/initrd
      echo ${kern.version} > $out/kernel-version
    '';

  clippy = workspace.overrideAttrs (old: {
    pname = "weir-clippy";
    buildPhase = ''
      runHook preBuild
      cargo clippy --offline --all-targets -- -D warnings
      mkdir -p $out
      runHook postBuild
    '';
    installPhase = "true";
  });

  devShell = pkgs.mkShell {
    packages = [ toolchain bpf-linker llvm.clang pkgs.skopeo pkgs.umoci pkgs.docker-distribution ]
      ++ labTools;
  };
in
{
  inherit pkgs toolchain bpf-linker agent weir-image lab oci-image kernel nodeImage clippy devShell;
}
