#!/bin/sh
# Build the .deb with plain dpkg-deb (no debhelper): the onefile binary in /usr/bin, the unit
# and the backup service and timer (not enabled) in /lib/systemd/system, the production config
# as a conffile in /etc/ct-appliance.
# File dates come from SOURCE_DATE_EPOCH (the last commit) so the package is reproducible too.
# Usage: packaging/build-deb.sh VERSION BINARY OUT.deb   (run from the repository root)
set -eu

version=$1 binary=$2 out=$3
stage=build/work/deb
root="$stage/root"

[ -x "$binary" ] || { echo "build-deb.sh: $binary missing: run make binary" >&2; exit 1; }

SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct)}
export SOURCE_DATE_EPOCH
# The binary needs the glibc it was built against (pyenv/Debian libpython), or newer.
glibc=$(ldd --version | sed -n '1s/.* \([0-9][0-9.]*\)$/\1/p')

rm -rf "$stage"
umask 022
install -d "$root/DEBIAN" "$root/usr/bin" "$root/lib/systemd/system" "$root/etc/ct-appliance" \
    "$root/usr/lib/ct-appliance" "$root/usr/share/doc/ct-appliance"
install -m 0755 "$binary" "$root/usr/bin/ct-appliance"
install -m 0644 systemd/ct-appliance.service systemd/ct-appliance-backup.service \
    systemd/ct-appliance-backup.timer "$root/lib/systemd/system/"
install -m 0644 packaging/config.yaml "$root/etc/ct-appliance/config.yaml"
install -m 0755 packaging/example-import "$root/usr/lib/ct-appliance/example-import"
for doc in docs/INSTALL.md config.example.yaml README.md systemd/port-443.conf; do
    [ -f "$doc" ] && install -m 0644 "$doc" "$root/usr/share/doc/ct-appliance/"
done
cat > "$root/usr/share/doc/ct-appliance/copyright" <<TXT
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: ct-appliance
Comment: a single PyInstaller binary; it bundles CPython and the Python packages pinned in
 pyproject.toml, each under its own licence.
TXT

installed_kb=$(du -sk --exclude=DEBIAN "$root" | cut -f1)
sed -e "s/@VERSION@/$version/" -e "s/@INSTALLED_SIZE@/$installed_kb/" -e "s/@GLIBC@/$glibc/" \
    packaging/deb/control.in > "$root/DEBIAN/control"
install -m 0644 packaging/deb/conffiles "$root/DEBIAN/conffiles"
for script in postinst prerm postrm; do
    install -m 0755 "packaging/deb/$script" "$root/DEBIAN/$script"
done
(cd "$root" && find . -path ./DEBIAN -prune -o -type f -print | sed 's|^\./||' | LC_ALL=C sort \
    | xargs md5sum > DEBIAN/md5sums)
find "$root" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +

mkdir -p "$(dirname "$out")"
dpkg-deb --root-owner-group -Zxz --build "$root" "$out" >/dev/null
echo "built $out:"
ls -l "$out"
sha256sum "$out"
