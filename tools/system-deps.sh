#!/usr/bin/env bash
# Makes sure the real binaries the tests drive are installed: Prometheus + promtool, Alertmanager + amtool,
# Redis, and Chromium's headless shell for the browser tests (Playwright drives Debian's build; it never downloads
# a browser).
# Installs missing ones from Debian's packages when running as root (as CI does); otherwise says exactly what to
# install and fails.
set -euo pipefail

declare -A package_of=(
  [prometheus]=prometheus
  [promtool]=prometheus
  [prometheus-alertmanager]=prometheus-alertmanager
  [amtool]=prometheus-alertmanager
  [redis-server]=redis-server
  [chromium-headless-shell]=chromium-headless-shell
)

missing=()
for binary in "${!package_of[@]}"; do
  command -v "$binary" >/dev/null 2>&1 || missing+=("${package_of[$binary]}")
done
[ ${#missing[@]} -eq 0 ] && exit 0

packages=$(printf '%s\n' "${missing[@]}" | sort -u | tr '\n' ' ')
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "missing system packages: $packages" >&2
  echo "install them with: sudo apt-get install -y --no-install-recommends $packages" >&2
  exit 1
fi
echo "installing system packages: $packages"
export DEBIAN_FRONTEND=noninteractive
apt-get update -q >/dev/null
# shellcheck disable=SC2086
apt-get install -y -q --no-install-recommends $packages >/dev/null
# Debian starts the services it installs; the tests start their own on free ports.
for service in prometheus prometheus-alertmanager redis-server; do
  if command -v service >/dev/null 2>&1; then service "$service" stop >/dev/null 2>&1 || true; fi
done
