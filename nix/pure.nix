# The parts of the flake that need no nixpkgs: plain `derivation`s whose builder is /bin/sh (a
# static busybox: NixOS sandboxes provide one, and Debian's Nix gets one through
# `extra-sandbox-paths = /bin/sh=/bin/busybox`). These build for real with any Nix, also where
# nixpkgs cannot be fetched; the flake's checks include them.
{ system, pins, src }:
let
  shell = name: script: env:
    derivation ({
      inherit name system;
      builder = "/bin/sh";
      args = [ "-e" "-c" script ];
    } // env);

  manifests = builtins.path {
    name = "weir-kubernetes-manifests-source";
    path = ../images/kubernetes;
  };
in
{
  # `kubectl apply -f result/weir.yaml`: every manifest in one file, in a fixed order.
  kubernetes-manifests = shell "weir-kubernetes-manifests-${pins.weirVersion}" ''
    mkdir -p $out
    for f in crd-prefilterdenylist.yaml serviceaccount.yaml rbac.yaml configmap.yaml daemonset.yaml; do
      test -f ${manifests}/$f || { echo "missing $f" >&2; exit 1; }
      echo "# --- images/kubernetes/$f" >> $out/weir.yaml
      cat ${manifests}/$f >> $out/weir.yaml
      echo "---" >> $out/weir.yaml
    done
    cp ${manifests}/privileged-fallback.json ${manifests}/kube-proxy.md $out/
  '' { };

  checks = {
    # The pins agree with each other and with what the rest of the repository builds with.
    pins = shell "weir-check-pins" ''
      fail() { echo "pins: $*" >&2; exit 1; }
      grep -q 'aya = { version = "=0.14.0"' ${src}/Cargo.toml || fail "Cargo.toml no longer pins aya =0.14.0"
      grep -q 'bpf-linker --version ${pins.bpfLinker.version}' ${src}/lab/setup.sh \
        || fail "lab/setup.sh installs another bpf-linker than ${pins.bpfLinker.version}"
      grep -q 'llvm-sys ${toString pins.rust.llvmMajor}' ${src}/nix/bpf-linker/Cargo.lock \
        || fail "nix/bpf-linker/Cargo.lock has no llvm-sys for LLVM ${toString pins.rust.llvmMajor}"
      grep -q '^version = 4' ${src}/Cargo.lock || fail "Cargo.lock is not a version 4 lock"
      # importCargoLock vendors registry crates by their Cargo.lock checksums: no git sources.
      if grep -q 'source = "git+' ${src}/Cargo.lock; then fail "Cargo.lock has git dependencies"; fi
      for member in agent bpf/common bpf/ebpf lab images/oci; do
        test -f ${src}/$member/Cargo.toml || fail "workspace member $member missing from the source"
      done
      echo ok > $out
    '' { };

    # Every manifest is a Kubernetes object (the full schema check is the Rust test
    # `kubernetes_manifests`, which needs no cluster either).
    manifests-shape = shell "weir-check-manifests-shape" ''
      for f in ${manifests}/*.yaml; do
        grep -q '^apiVersion: ' $f || { echo "$f: no apiVersion" >&2; exit 1; }
        grep -q '^kind: ' $f || { echo "$f: no kind" >&2; exit 1; }
      done
      echo ok > $out
    '' { };
  };
}
