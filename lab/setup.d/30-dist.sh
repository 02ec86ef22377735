# Distribution: the OCI image tests (a loopback registry, skopeo, umoci), the container test
# (Docker engine, started by the test itself on private paths), and Nix for the flake's checks.
# Sourced by lab/setup.sh, which defines `say`.

DIST_PACKAGES=(docker-registry skopeo umoci docker.io nix-bin busybox-static)
dist_missing=()
for p in "${DIST_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || dist_missing+=("$p")
done
if ((${#dist_missing[@]})); then
  say "installing distribution tooling: ${dist_missing[*]}"
  apt-get update -qq || say "apt-get update reported errors; installing anyway"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${dist_missing[@]}" >/dev/null
  # The tests start their own registry and engine, by PID, on private paths and ports; services
  # the packages start under systemd would only hold ports and touch the host's firewall.
  if command -v systemctl >/dev/null; then
    for unit in docker.service docker.socket containerd.service docker-registry.service; do
      if systemctl is-active -q "$unit" 2>/dev/null; then systemctl stop "$unit" || true; fi
    done
  fi
else
  say "distribution tooling present (registry, skopeo, umoci, docker, nix)"
fi
unset dist_missing
