#!/usr/bin/env bash
# Install what Circus needs from Debian's packages (idempotent, quick when done).
# Runs as root on Debian 12; as another user it only reports what is missing.
set -euo pipefail

PACKAGES=(
  nix-bin git ca-certificates
  postgresql redis-server
  python3 python3-venv python3-dev build-essential
  libpq-dev libldap2-dev libsasl2-dev
  openssh-server openssh-client slapd ldap-utils
  chromium zstd xz-utils wrk
  prometheus nginx-light systemd
  rabbitmq-server iproute2 util-linux
)
# installed for their checkers only (promtool check metrics/rules, nginx -t,
# systemd-analyze verify) or for private servers the tests start themselves
# (rabbitmq-server: a node per test module, tests/helpers/rabbitmq.py);
# their system services must not run (9090, 80 and 5672 would be taken on a CI host)
TOOL_SERVICES=(prometheus nginx rabbitmq-server)

missing=()
for pkg in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done

if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "missing Debian packages (run as root to install): ${missing[*]}" >&2
    exit 1
  fi
  echo "installing: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${missing[@]}"
  if [ -d /run/systemd/system ]; then
    systemctl disable --now "${TOOL_SERVICES[@]}" >/dev/null 2>&1 || true
  fi
fi

# Debian's nix-bin runs single-user as root without a daemon; its nix.conf
# disables the sandbox for ad-hoc Nix calls. Circus itself passes
# `sandbox = true` and `sandbox-paths` (the /bin/sh builders' needs) to every
# build it starts (`[nix] sandbox`), whatever this file says.
if [ "$(id -u)" -eq 0 ]; then
  mkdir -p /nix/var/nix/gcroots /nix/var/nix/profiles
  if ! grep -qs '^sandbox' /etc/nix/nix.conf; then
    mkdir -p /etc/nix
    echo 'sandbox = false' >> /etc/nix/nix.conf
  fi
  # Nix as root builds as members of `build-users-group` (nixbld); a group
  # without members fails every build ("has no members"), so create the build
  # users the way Nix's own installer does.
  getent group nixbld >/dev/null || groupadd -r nixbld
  for n in $(seq 1 8); do
    id "nixbld$n" >/dev/null 2>&1 || useradd --system --no-create-home \
      --home-dir /var/empty --gid nixbld --groups nixbld \
      --shell /usr/sbin/nologin --comment "Nix build user $n" "nixbld$n"
  done
  mkdir -p /run/sshd
fi
