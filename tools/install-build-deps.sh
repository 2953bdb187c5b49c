#!/usr/bin/env bash
# Installs the Debian packages that building vmar needs, plus any named on the command line,
# with apt-get, only those missing. tools/demo, tools/test and tools/package.sh call it, so a
# fresh Debian 12 machine with only the Rust toolchain can run them. Without root it says
# what to install (sudo if available) instead of failing later inside cargo.
#
#     tools/install-build-deps.sh [PACKAGE...]
set -euo pipefail

# bindgen of the devicemapper and loopdev-3 crates needs libclang and the libdevmapper
# headers; the devicemapper crate probes with pkg-config; make drives the install.
need=()
for pkg in libdevmapper-dev libclang-dev pkg-config make "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need+=("$pkg")
done
[ "${#need[@]}" -eq 0 ] && exit 0

sudo=()
if [ "$(id -u)" != 0 ]; then
    if command -v sudo >/dev/null; then
        sudo=(sudo)
    else
        echo "install-build-deps: as root, run: apt-get install ${need[*]}" >&2
        exit 1
    fi
fi
echo "+ apt-get install ${need[*]}" >&2
"${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq
"${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -qq --no-install-recommends "${need[@]}" >&2
