#!/usr/bin/env bash
# Builds the Debian package work/package/vmar_VERSION_ARCH.deb from this tree: release
# binaries (stripped), the systemd unit, the udev rule, /etc/vmar/vmar.toml (a conffile), man
# pages, completions and docs, with the maintainer scripts of packaging/deb. Then checks it
# with lintian (no overrides: errors and warnings fail the build). Prints the path of the
# .deb on its last line.
#
#     tools/package.sh [--no-lintian]
set -euo pipefail
cd "$(dirname "$0")/.."

lintian=1
[ "${1:-}" = --no-lintian ] && lintian=0

needs=(dpkg-dev fakeroot binutils)
[ "$lintian" = 0 ] || needs+=(lintian)
tools/install-build-deps.sh "${needs[@]}"

version=$(cargo metadata --no-deps --format-version 1 --locked |
    python3 -c 'import json,sys; print(next(p["version"] for p in json.load(sys.stdin)["packages"] if p["name"]=="vmar"))')
arch=$(dpkg --print-architecture)
out=work/package
stage=$out/vmar_${version}_$arch
rm -rf "$stage"
mkdir -p "$stage"

# The same tree as `make install`, then what a Debian package adds or does differently.
make --no-print-directory install DESTDIR="$PWD/$stage" >/dev/null
strip --strip-unneeded --remove-section=.comment --remove-section=.note "$stage"/usr/bin/vmard "$stage"/usr/bin/vmarctl
gzip -9n "$stage"/usr/share/man/man1/*.1 "$stage"/usr/share/man/man5/*.5 "$stage"/usr/share/man/man8/*.8
doc=$stage/usr/share/doc/vmar
install -Dm644 README.md "$doc/README.md"
install -Dm644 packaging/deb/copyright "$doc/copyright"
sed "s/@VERSION@/$version/" packaging/deb/changelog | gzip -9n > "$doc/changelog.gz"
chmod 644 "$doc/changelog.gz"

# Shared-library dependencies of the binaries, as dpkg-shlibdeps computes them.
shlibs_dir=$(mktemp -d)
trap 'rm -rf "$shlibs_dir"' EXIT
mkdir -p "$shlibs_dir/debian"
printf 'Source: vmar\n\nPackage: vmar\nArchitecture: any\n' > "$shlibs_dir/debian/control"
# (It warns that the binaries are not under debian/vmar/, which only matters to debhelper.)
shlibs=$(cd "$shlibs_dir" && dpkg-shlibdeps -O "$OLDPWD/$stage/usr/bin/vmard" "$OLDPWD/$stage/usr/bin/vmarctl" \
    2> >(grep -v "binaries to analyze should already be installed" >&2) | sed -n 's/^shlibs:Depends=//p')
[ -n "$shlibs" ] || { echo "package: dpkg-shlibdeps found no dependencies" >&2; exit 1; }

mkdir -p "$stage/DEBIAN"
size=$(du -sk --exclude=DEBIAN "$stage" | cut -f1)
sed -e "s/@VERSION@/$version/" -e "s/@ARCH@/$arch/" -e "s/@SIZE@/$size/" -e "s/@SHLIBS@/$shlibs/" \
    packaging/deb/control > "$stage/DEBIAN/control"
install -m644 packaging/deb/conffiles "$stage/DEBIAN/conffiles"
for script in postinst prerm postrm; do
    install -m755 "packaging/deb/$script" "$stage/DEBIAN/$script"
done
(cd "$stage" && find . -type f ! -path './DEBIAN/*' -printf '%P\0' | sort -z | xargs -0 md5sum) \
    > "$stage/DEBIAN/md5sums"
chmod 644 "$stage/DEBIAN/md5sums"

deb=$out/vmar_${version}_$arch.deb
fakeroot dpkg-deb --root-owner-group -Zxz --build "$stage" "$deb" >/dev/null
if [ $lintian = 1 ]; then
    echo "+ lintian $deb" >&2
    # --fail-on warning: errors and warnings fail the build; info tags are shown.
    lintian --fail-on error,warning --info "$deb" >&2
fi
echo "$deb"
