{
  description = "Weir: eBPF service load balancing for Kubernetes nodes (a kube-proxy replacement), and its lab";

  inputs = {
    nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";
    # The nightly toolchain with rust-src, by date; bpf-linker is built here against the LLVM
    # major of that nightly (nix/pins.nix pins the two together).
    rust-overlay = {
      url = "github:oxalica/rust-overlay";
      inputs.nixpkgs.follows = "nixpkgs";
    };
  };

  # Outputs are attribute sets with literal names and lazy values: evaluating or building a part
  # that needs no nixpkgs (lib.pins, the manifests bundle, the pins checks) never fetches
  # nixpkgs, so those parts build even where nixpkgs cannot be fetched.
  outputs = { self, nixpkgs, rust-overlay }:
    let
      pins = import ./nix/pins.nix;
      systems = [ "x86_64-linux" "aarch64-linux" ];
      forSystems = f: builtins.listToAttrs (map (system: { name = system; value = f system; }) systems);

      # The repository as the builds see it: only tracked files (a git flake), no target/.
      src = self;

      pure = system: import ./nix/pure.nix { inherit system pins src; };
      withNixpkgs = system: import ./nix/packages.nix {
        inherit pins src;
        pkgs = import nixpkgs {
          inherit system;
          overlays = [ rust-overlay.overlays.default ];
        };
      };

      kernelName = k: "kernel-" + builtins.replaceStrings [ "." ] [ "_" ] k.series;
      nodeImageName = k: "node-image-" + builtins.replaceStrings [ "." ] [ "_" ] k.series;
      perKernel = name: part: system:
        builtins.listToAttrs (map (k: { name = name k; value = ((withNixpkgs system).${part}) k; }) pins.kernels);
    in
    {
      lib = { inherit pins; };

      packages = forSystems (system: {
        # Needs no nixpkgs.
        kubernetes-manifests = (pure system).kubernetes-manifests;
        # Need nixpkgs.
        default = (withNixpkgs system).agent;
        agent = (withNixpkgs system).agent;
        lab = (withNixpkgs system).lab;
        weir-image = (withNixpkgs system).weir-image;
        bpf-linker = (withNixpkgs system).bpf-linker;
        rust-toolchain = (withNixpkgs system).toolchain;
        # `$(nix build --print-out-paths .#oci-image) | docker load` (a docker-archive stream).
        oci-image = (withNixpkgs system).oci-image;
      }
      // perKernel kernelName "kernel" system
      // perKernel nodeImageName "nodeImage" system);

      apps = forSystems (system: {
        # `nix run .#lab -- suite` from a checkout (scenarios/ is read from the working directory).
        lab = {
          type = "app";
          program = "${(withNixpkgs system).lab}/bin/weir-lab";
        };
        weir-image = {
          type = "app";
          program = "${(withNixpkgs system).weir-image}/bin/weir-image";
        };
      });

      devShells = forSystems (system: {
        default = (withNixpkgs system).devShell;
      });

      checks = forSystems (system: {
        # Need no nixpkgs: built for real by the Rust test images/oci/tests/flake.rs.
        pins = (pure system).checks.pins;
        manifests-shape = (pure system).checks.manifests-shape;
        kubernetes-manifests = (pure system).kubernetes-manifests;
        # Need nixpkgs.
        agent = (withNixpkgs system).agent;
        lab = (withNixpkgs system).lab;
        oci-image = (withNixpkgs system).oci-image;
        clippy = (withNixpkgs system).clippy;
      });

      formatter = forSystems (system: (withNixpkgs system).pkgs.nixpkgs-fmt);
    };
}
