#!/usr/bin/env python3
"""Digest sidecars across hosts over real NFS, in one QEMU guest (tools/guest.py).

The guest runs Debian's kernel NFS server (nfsd with nfs-kernel-server's rpc.nfsd,
rpc.mountd and exportfs, NFSv4.2 only, over loopback) exporting a tmpfs, and three vmard
"hosts" (a, b, c), each with its own state dir, socket, vmar.toml and its own NFS mount of
the export (`nosharecache`: each mount has its own superblock and so its own page cache;
the check `hosts-have-their-own-page-cache` shows it). They share one NFSv4 client
identity, so damage to sidecars is done on the server, not through another host's mount. What each host reads over NFS comes
from its mount's `bytes:` line in /proc/self/mountstats (bytes read from the server).
The kernel is shared, so this is not a fleet of machines: it is one NFS server and three
independent NFS clients.

Checks: a captures 4 images and writes sidecars (fleet manifest); b imports all with 0 image
bytes read and equal content and map fingerprints (`fleet-status`); a tampered, a
truncated, a stale and an untrusted sidecar are refused by b; a and c capture one new image
at once and leave one valid sidecar and no temporary; the NFS server is stopped and
restarted while b imports, and the import completes with the same fingerprint.
Prints `N passed, N failed`; exit status 0 only when nothing failed.

Downloads once (apt-get download, cached in work/fleet): nfs-kernel-server, nfs-common,
libnfsidmap1, libwrap0 (extracted, not installed).

    tools/fleet-test.py [--timeout SECONDS] [--memory MIB]
"""

import argparse
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import guest

ROOT = guest.ROOT
WORK = ROOT / "work" / "fleet"
DEBS = ["nfs-kernel-server", "nfs-common", "libnfsidmap1", "libwrap0"]
NFS_BINARIES = ["usr/sbin/rpc.nfsd", "usr/sbin/rpc.mountd", "usr/sbin/exportfs",
                "sbin/mount.nfs"]
MODULES = ["nfsd", "nfsv4"]

INIT = r"""echo "FLEET-TEST: booted $(uname -r) in $(cut -d' ' -f1 /proc/uptime) s"
export PATH=/vmar/bin:/usr/sbin:/sbin:/bin
ip link set lo up
pass=0; fail=0
check() { if eval "$2"; then echo "FLEET-TEST: PASS $1"; pass=$((pass+1)); else echo "FLEET-TEST: FAIL $1 ($2)"; fail=$((fail+1)); fi; }
ctl() { h=$1; shift; vmarctl --socket /h/$h/sock "$@"; }
nfsread() { awk -v m="/mnt/$1" '$1=="device" {on=($5==m)} on && $1=="bytes:" {print $6; exit}' /proc/self/mountstats; }
count() { grep -c "$1" "$2" || true; }

# The server: nfsd over loopback, NFSv4 only (no rpcbind), short grace so restarts are quick.
mkdir -p /proc/fs/nfsd /var/lib/nfs/v4recovery /export /etc
mount -t nfsd nfsd /proc/fs/nfsd
touch /var/lib/nfs/etab /var/lib/nfs/rmtab
mount -t tmpfs -o size=1200M export /export
echo "/export 127.0.0.1(rw,sync,no_subtree_check,no_root_squash,fsid=0)" > /etc/exports
echo 10 > /proc/fs/nfsd/nfsv4leasetime
echo 10 > /proc/fs/nfsd/nfsv4gracetime
exportfs -ra
rpc.mountd -N 3 --no-udp
rpc.nfsd -N 3 -U -p 2049 8 || echo "FLEET-TEST: rpc.nfsd failed"
sleep 1
for h in a b c; do
    mkdir -p /mnt/$h /h/$h
    mount.nfs4 127.0.0.1:/ /mnt/$h -o vers=4.2,nosharecache,hard,timeo=50 \
        || echo "FLEET-TEST: mount of host $h failed"
done
echo 'sidecars = "write"' > /h/a/vmar.toml
printf 'sidecars = "read"\nsidecar_sample = 0\n' > /h/b/vmar.toml
echo 'sidecars = "write"' > /h/c/vmar.toml
for h in a b c; do
    VMAR_LOG=info vmard --config /h/$h/vmar.toml --state-dir /h/$h/state --image-root /mnt/$h \
        --sim /h/$h/sim --socket /h/$h/sock 2>/h/$h/log &
done
for i in $(seq 100); do ctl a ping >/dev/null 2>&1 && ctl b ping >/dev/null 2>&1 && ctl c ping >/dev/null 2>&1 && break; sleep 0.2; done

# Four images on the share (written on the server): shared and unique data, holes.
dd if=/dev/urandom of=/export/img0.raw bs=1M count=16 2>/dev/null
dd if=/export/img0.raw of=/export/img1.raw bs=1M count=8 2>/dev/null
dd if=/dev/urandom bs=1M count=8 2>/dev/null >> /export/img1.raw
dd if=/dev/urandom of=/export/img2.raw bs=1M count=4 seek=8 2>/dev/null
truncate -s 16M /export/img2.raw
dd if=/dev/urandom of=/export/img3.raw bs=1M count=16 2>/dev/null
printf 'img0.raw\nimg1.raw\nimg2.raw\nimg3.raw\n' > /export/fleet.manifest
sync

ctl a --json capture --manifest /mnt/a/fleet.manifest --host a > /tmp/a.json 2>&1
check a-captures-and-writes-4-sidecars '[ "$(count "\"written\": true" /tmp/a.json)" = 4 ]'
check sidecars-on-the-share '[ "$(ls -a /export | grep -c "vmar-digests$")" = 4 ]'
before=$(nfsread b)
ctl b --json capture --manifest /mnt/b/fleet.manifest --host b > /tmp/b.json 2>&1
read_b=$(( $(nfsread b) - before ))
echo "FLEET-TEST: host b read $read_b bytes over NFS importing 64 MiB of images"
check b-imports-all-4 '[ "$(count "\"imported\": true" /tmp/b.json)" = 4 ]'
check b-reads-0-image-bytes '[ "$(count "\"bytes_read\": 0" /tmp/b.json)" = 4 ]'
check b-nfs-reads-are-the-sidecars-only '[ "$read_b" -gt 0 ] && [ "$read_b" -lt 2097152 ]'
check same-content-and-maps-on-a-and-b 'ctl a fleet-status /mnt/a/fleet.manifest'
ctl a images -o name,fingerprint --noheadings > /tmp/fa; ctl b images -o name,fingerprint --noheadings > /tmp/fb
check same-fingerprints 'cmp -s /tmp/fa /tmp/fb && [ -s /tmp/fa ]'
# Each host's mount has its own page cache: a hashed img3 (its cache holds it), b reads it
# from the server all the same.
before=$(nfsread b); cat /mnt/b/img3.raw > /dev/null; read3=$(( $(nfsread b) - before ))
check hosts-have-their-own-page-cache '[ "$read3" -ge 16000000 ]'

refused() {  # refused HOST IMAGE KIND: forget, capture again, the sidecar refused as KIND
    ctl $1 forget ${2%.raw} >/dev/null 2>&1
    ctl $1 --json capture /mnt/$1/$2 > /tmp/r.json 2>&1
    grep -q "\"refused\": \"$3" /tmp/r.json && grep -q '"imported": false' /tmp/r.json \
        || { echo "FLEET-TEST: $1 capture of $2 answered:"; head -c 2000 /tmp/r.json; echo; tail -n 8 /h/$1/log; false; }
}
fp() { ctl $1 images -o name,fingerprint --noheadings | awk -v n="$2" '$1==n {print $2}'; }
# Damage done on the server: the three mounts share one NFSv4 client identity (one kernel),
# so a write through a's mount does not recall the read delegation b holds on the sidecar
# and b would go on reading its cached copy; a local write on the server breaks it, as a
# write from another machine would.
printf '\377' | dd of=/export/.img1.raw.vmar-digests bs=1 seek=300 conv=notrunc 2>/dev/null
check tampered-refused 'refused b img1.raw untrusted'
check tampered-then-hashed-same-fingerprint '[ -n "$(fp a img1)" ] && [ "$(fp a img1)" = "$(fp b img1)" ]'
# Not truncate(1): it opens with O_NONBLOCK, and while b holds a read delegation on the
# sidecar the lease break then fails the open with EAGAIN instead of waiting for the recall.
dd if=/dev/null of=/export/.img2.raw.vmar-digests bs=1 seek=1000 2>/dev/null
check truncated-on-the-server '[ "$(stat -c %s /export/.img2.raw.vmar-digests)" = 1000 ]'
check truncated-refused 'refused b img2.raw corrupt'
chmod 666 /export/.img0.raw.vmar-digests
check untrusted-refused 'refused b img0.raw untrusted'
touch /export/img3.raw
check stale-refused 'refused b img3.raw stale'
# c writes: after a refusal it hashes and writes a good sidecar again, which b imports.
ctl c --json capture /mnt/c/img1.raw > /tmp/c.json 2>&1
check refused-then-rewritten 'grep -q "\"written\": true" /tmp/c.json'
ctl b forget img1 >/dev/null 2>&1
ctl b --json capture /mnt/b/img1.raw > /tmp/r.json 2>&1
check rewritten-imported 'grep -q "\"imported\": true" /tmp/r.json'

# Two hosts capture one new image at once.
dd if=/dev/urandom of=/export/img4.raw bs=1M count=32 2>/dev/null; sync
ctl a --json capture /mnt/a/img4.raw > /tmp/ca.json 2>&1 & pa=$!
ctl c --json capture /mnt/c/img4.raw > /tmp/cc.json 2>&1 & pc=$!
wait $pa; ra=$?; wait $pc; rc=$?
check concurrent-both-succeed '[ $ra = 0 ] && [ $rc = 0 ]'
check concurrent-one-sidecar-no-temporary '[ "$(ls -a /export | grep -c img4)" = 2 ] && [ -z "$(ls -a /export | grep "\.tmp$")" ]'
check concurrent-same-fingerprint '[ -n "$(fp a img4)" ] && [ "$(fp a img4)" = "$(fp c img4)" ]'
ctl b --json capture /mnt/b/img4.raw > /tmp/r.json 2>&1
check concurrent-sidecar-imported 'grep -q "\"imported\": true" /tmp/r.json'

# The NFS server stops and restarts while b imports a big image's sidecar.
dd if=/dev/urandom of=/export/img5.raw bs=1M count=128 2>/dev/null; sync
ctl a --json capture /mnt/a/img5.raw > /tmp/a5.json 2>&1
# The server goes away first, so the import is in flight whatever this machine's speed:
# it must wait out the outage (a hard mount) and still be running when the server is back.
rpc.nfsd 0
echo "FLEET-TEST: nfsd stopped"
ctl b --json capture /mnt/b/img5.raw > /tmp/b5.json 2>&1 & pb=$!
sleep 5
if kill -0 $pb 2>/dev/null; then inflight=yes; else inflight=no; fi
echo "FLEET-TEST: import in flight after 5 s without the server: $inflight"
rpc.nfsd -N 3 -U -p 2049 8
echo "FLEET-TEST: nfsd restarted"
wait $pb; rb=$?
check import-survives-server-restart '[ $rb = 0 ] && [ "$inflight" = yes ] && grep -q "\"imported\": true" /tmp/b5.json'
check restart-same-fingerprint '[ -n "$(fp b img5)" ] && [ "$(fp a img5)" = "$(fp b img5)" ]'

for f in /tmp/a.json /tmp/b.json /tmp/b5.json; do echo "== $f"; head -c 3000 $f; echo; done
for h in a b c; do echo "== vmard $h"; tail -n 15 /h/$h/log; done
echo "FLEET-TEST: $pass passed, $fail failed"
sync
poweroff -f
"""


def fetch_nfs():
    """nfs-kernel-server and what its programs need, extracted once under work/fleet."""
    root = WORK / "nfs-root"
    if not (root / "done").exists():
        guest.log("downloading " + " ".join(DEBS))
        debs = WORK / "debs"
        shutil.rmtree(debs, ignore_errors=True)
        debs.mkdir(parents=True)
        guest.run(["apt-get", "download", *DEBS], cwd=debs, stdout=subprocess.DEVNULL)
        shutil.rmtree(root, ignore_errors=True)
        for deb in debs.glob("*.deb"):
            guest.run(["dpkg-deb", "-x", str(deb), str(root)])
        (root / "done").touch()
    return root


def nfs_files(root):
    """Guest path -> host path of the NFS programs, their libraries and /etc/netconfig."""
    files = {"/etc/netconfig": "/etc/netconfig", "/etc/services": "/etc/services",
             "/etc/protocols": "/etc/protocols"}
    libdirs = [root / "usr/lib/x86_64-linux-gnu", root / "lib/x86_64-linux-gnu"]
    env = dict(os.environ, LD_LIBRARY_PATH=":".join(str(d) for d in libdirs))
    for binary in NFS_BINARIES:
        path = root / binary
        files["/" + binary] = str(path)
        out = guest.run(["ldd", str(path)], capture_output=True, text=True, env=env).stdout
        for line in out.splitlines():
            if "not found" in line:
                sys.exit(f"fleet-test: {binary} needs a library not found: {line.strip()}")
            m = re.search(r"(/\S+)", line.split("=>")[-1])
            if m and Path(m.group(1)).exists():
                lib = Path(m.group(1))
                guest_path = str(lib)
                if str(lib).startswith(str(root)):
                    guest_path = "/" + str(lib.relative_to(root))
                files[guest_path] = str(lib.resolve())
    files["/sbin/mount.nfs4"] = str(root / "sbin/mount.nfs")
    return files


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--timeout", type=int, default=1200)
    parser.add_argument("--memory", type=int, default=2560, help="guest memory in MiB")
    args = parser.parse_args()

    guest.ensure_packages()
    vmlinuz, moddir = guest.fetch_kernel()
    udev = guest.fetch_udev()
    WORK.mkdir(parents=True, exist_ok=True)
    nfs = fetch_nfs()
    guest.log("building vmard and vmarctl (release)")
    guest.run(["cargo", "build", "--release", "--locked", "--bins", "-p", "vmar"], cwd=ROOT)
    binaries = [ROOT / "target/release/vmard", ROOT / "target/release/vmarctl"]
    initramfs = guest.build_initramfs(WORK, moddir, udev, guest.MODULES + MODULES, binaries,
                                      INIT, nfs_files(nfs))
    output, seconds = guest.boot(vmlinuz, initramfs, args.timeout, args.memory)
    guest.finish(WORK, output, seconds, "FLEET-TEST",
                 lambda line: "FLEET-TEST" in line or "GUEST:" in line)


if __name__ == "__main__":
    main()
