#!/bin/sh
# Build (once) the cached Debian bookworm root the system test boots, under build/cache/.
# The mirror is the one this machine's apt already uses; no other host is contacted.
# Usage: tests/system/rootfs.sh [CACHE_DIR]   (prints the root's path)
set -eu

cache=${1:-build/cache}
root="$cache/bookworm-root"
# The cache is rebuilt whenever this script changes (package list, units masked...).
stamp_want=$(sha256sum "$0" | cut -d' ' -f1)

if [ -f "$root/.ct-rootfs" ] && [ "$(cat "$root/.ct-rootfs")" = "$stamp_want" ]; then
    echo "$root"
    exit 0
fi

mirror=$(
    {
        cat /etc/apt/sources.list.d/*.sources 2>/dev/null \
            | awk '/^URIs:/ {print $2}'
        cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null \
            | awk '$1 == "deb" && $3 ~ /^bookworm$/ {print ($2 ~ /^\[/ ? $3 : $2)}'
    } | grep -E '/debian/?$' | head -n 1
)
if [ -z "$mirror" ]; then
    echo "rootfs.sh: no Debian mirror found in /etc/apt/sources.list*" >&2
    exit 1
fi

for tool in debootstrap systemd-nspawn; do
    command -v "$tool" >/dev/null 2>&1 || {
        echo "rootfs.sh: installing debootstrap systemd-container" >&2
        apt-get update -qq >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap systemd-container >&2
        break
    }
done

tmp="$root.tmp"
rm -rf "$tmp" "$root"
mkdir -p "$cache"
echo "rootfs.sh: debootstrap bookworm from $mirror (a few minutes, once)" >&2
# minbase + systemd as init; curl is the only HTTP client inside (the point is a root
# without Python, as on a partner's VM).
debootstrap --variant=minbase \
    --include=systemd,systemd-sysv,dbus,procps,curl,ca-certificates \
    bookworm "$tmp" "$mirror" >&2

echo ct-system-test > "$tmp/etc/hostname"
printf 'deb %s bookworm main\n' "$mirror" > "$tmp/etc/apt/sources.list"
# Units that only slow a container boot down or fail without hardware.
for unit in systemd-timesyncd.service apt-daily.timer apt-daily-upgrade.timer \
    e2scrub_all.timer fstrim.timer getty@tty1.service console-getty.service \
    systemd-networkd-wait-online.service; do
    ln -sf /dev/null "$tmp/etc/systemd/system/$unit"
done
# Persistent journal so a test can read what happened before a restart.
mkdir -p "$tmp/var/log/journal"
rm -f "$tmp/etc/machine-id" && : > "$tmp/etc/machine-id"
apt-get -o Dir="$tmp" clean >/dev/null 2>&1 || true
rm -rf "$tmp/var/cache/apt/archives/"*.deb "$tmp/var/lib/apt/lists/"*_Packages 2>/dev/null || true
echo "$stamp_want" > "$tmp/.ct-rootfs"
mv "$tmp" "$root"
echo "$root"
