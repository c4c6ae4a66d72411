#!/usr/bin/env bash
# System packages the test suite drives for real: a headless Chromium (report pages are opened
# in it). Installed with apt-get when missing; without root or apt, say what to install and go
# on (the tests that need a package then skip and name it).
set -euo pipefail

packages=()
command -v chromium-headless-shell >/dev/null 2>&1 || command -v chromium >/dev/null 2>&1 \
    || packages+=(chromium-headless-shell)
for pkg in "$@"; do
    dpkg -s "$pkg" >/dev/null 2>&1 || packages+=("$pkg")
done

if [ ${#packages[@]} -eq 0 ]; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "mergeopt setup: please install these system packages: ${packages[*]} (tests that need them will skip)" >&2
    exit 0
fi
echo "mergeopt setup: installing ${packages[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
