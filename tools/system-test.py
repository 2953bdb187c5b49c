#!/usr/bin/env python3
"""vmar on a real Debian 12 host, in a QEMU guest: systemd as PID 1, the .deb, libvirt.

Builds once (cached in work/system/) a Debian 12 root file system with debootstrap: systemd,
udev, dmsetup, lvm2, AppArmor, libvirt-daemon-system and qemu-system-x86, and Debian's
kernel, whose own vmlinuz and initrd boot it. Every run boots a fresh qcow2 overlay of that
root with a second, persistent disk mounted at /var/lib/vmar that carries the package built
by tools/package.sh, the guest-side script (tools/system-test-guest.sh) and the images (staged
beside /var/lib/vmar/images, which a fresh install must create), one of
which boots the tiny VM that libvirt starts in the guest (tools/system-test-boot.asm: it
reads its whole disk through the BIOS and prints a checksum).
The guest script runs as a systemd service after multi-user.target, in two boots with a
reboot between them, and reports on the serial console; this tool prints its results and
`N passed, N failed`, and exits non-zero on any failure.

    tools/system-test.py [--timeout SECONDS] [--memory MIB] [--rebuild] [--quick] [--deb FILE]

--quick skips the VM that libvirt starts in the guest.
Needs root (debootstrap, mkfs.ext4 -d) and qemu-system-x86 (installed if missing). Uses TCG.
"""

import argparse
import hashlib
import os
import re
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import guest

ROOT = guest.ROOT
WORK = ROOT / "work" / "system"
SUITE = "bookworm"
MIRROR = os.environ.get("VMAR_SYSTEM_TEST_MIRROR", "http://deb.debian.org/debian")
# What a Debian 12 virtualisation host has: systemd as PID 1, udev, device-mapper tools, LVM
# (whose scanning vmar devices must escape), AppArmor (Debian's libvirt security driver),
# libvirt with QEMU. libpam-systemd provides the logind that polkitd (libvirt) needs.
PACKAGES = ["systemd-sysv", "libpam-systemd", "udev", "dmsetup", "lvm2", "apparmor",
            "libvirt-daemon-system", "libvirt-daemon-driver-qemu", "libvirt-clients",
            "qemu-system-x86", "qemu-utils", "linux-image-amd64", "kmod", "e2fsprogs",
            "fdisk", "procps", "jq", "dbus"]
# Bumped when the root file system's set-up below changes, so the cache is rebuilt.
SETUP_VERSION = "1"
ROOT_SIZE = "4G"
DATA_SIZE = "1G"

# The unit that runs the guest side after boot, on every boot, while the data disk holds it.
TEST_UNIT = """[Unit]
Description=vmar system test (guest side)
After=multi-user.target
ConditionPathExists=/var/lib/vmar/system-test/run.sh

[Service]
Type=oneshot
ExecStart=/bin/bash /var/lib/vmar/system-test/run.sh
StandardOutput=tty
StandardError=tty
TTYPath=/dev/ttyS0
TimeoutStartSec=infinity

[Install]
WantedBy=multi-user.target
"""

FSTAB = """/dev/vda / ext4 rw,errors=remount-ro 0 1
LABEL=vmar-data /var/lib/vmar ext4 defaults 0 2
"""


def log(message):
    guest.log(message)


def run(cmd, **kw):
    return subprocess.run(cmd, check=True, **kw)


def ensure_tools():
    guest.ensure_packages()
    missing = [pkg for tool, pkg in [("debootstrap", "debootstrap"), ("mkfs.ext4", "e2fsprogs"),
                                     ("qemu-img", "qemu-utils"), ("nasm", "nasm"),
                                     ("promtool", "prometheus")] if shutil.which(tool) is None]
    if missing:
        log(f"installing {' '.join(missing)}")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing], env=env)


def cache_key():
    return hashlib.sha256(f"{SUITE} {MIRROR} {PACKAGES} {SETUP_VERSION}".encode()).hexdigest()[:16]


def build_root(rebuild):
    """The cached root file system image and its kernel and initrd."""
    key = cache_key()
    base = WORK / f"root-{key}"
    image, done = base / "root.img", base / "done"
    if done.exists() and not rebuild:
        return image, base / "vmlinuz", base / "initrd.img"
    shutil.rmtree(base, ignore_errors=True)
    tree = base / "tree"
    tree.mkdir(parents=True)
    log(f"debootstrap {SUITE} with {' '.join(PACKAGES)} (once; cached in {base})")
    started = time.monotonic()
    run(["nice", "-n", "10", "debootstrap", "--variant=minbase",
         f"--include={','.join(PACKAGES)}", SUITE, str(tree), MIRROR],
        stdout=subprocess.DEVNULL)
    log(f"debootstrap took {time.monotonic() - started:.0f} s")
    (tree / "etc/fstab").write_text(FSTAB)
    (tree / "etc/hostname").write_text("vmar-host\n")
    (tree / "var/lib/vmar").mkdir(parents=True, exist_ok=True)
    unit = tree / "etc/systemd/system/vmar-system-test.service"
    unit.write_text(TEST_UNIT)
    wants = tree / "etc/systemd/system/multi-user.target.wants"
    wants.mkdir(parents=True, exist_ok=True)
    (wants / "vmar-system-test.service").symlink_to("/etc/systemd/system/vmar-system-test.service")
    # No network in the guest: libvirt's default network (dnsmasq, firewall) only slows boot.
    autostart = tree / "etc/libvirt/qemu/networks/autostart/default.xml"
    if autostart.is_symlink() or autostart.exists():
        autostart.unlink()
    # Nothing waits for a network or a login on the console.
    for name in ["getty@tty1.service", "serial-getty@ttyS0.service"]:
        (tree / "etc/systemd/system" / name).symlink_to("/dev/null")
    run(["chroot", str(tree), "passwd", "-d", "root"], stdout=subprocess.DEVNULL)
    for cache in ["var/cache/apt/archives", "var/lib/apt/lists"]:
        for entry in (tree / cache).glob("*"):
            if entry.is_file():
                entry.unlink()
    vmlinuz = next(tree.glob("boot/vmlinuz-*"))
    release = vmlinuz.name[len("vmlinuz-"):]
    shutil.copy2(vmlinuz, base / "vmlinuz")
    shutil.copy2(tree / f"boot/initrd.img-{release}", base / "initrd.img")
    log(f"mkfs.ext4 -d: {ROOT_SIZE} root image")
    run(["mkfs.ext4", "-q", "-F", "-L", "vmar-root", "-d", str(tree), str(image), ROOT_SIZE])
    shutil.rmtree(tree)
    done.write_text(key + "\n")
    return image, base / "vmlinuz", base / "initrd.img"


def build_boot_sector(sectors):
    """The VM that libvirt starts in the guest (tools/system-test-boot.asm): a boot sector
    that reads the whole disk through the BIOS and prints a checksum on the serial port."""
    out = WORK / "boot.bin"
    run(["nasm", "-f", "bin", f"-DSECTORS={sectors}", "-o", str(out),
         str(ROOT / "tools/system-test-boot.asm")])
    data = out.read_bytes()
    if len(data) != 512:
        sys.exit(f"system-test: the boot sector is {len(data)} bytes, not 512")
    return data


def checksum(data):
    """What the boot sector prints: over little-endian 32-bit words w, a += w, b += a
    (mod 2^32); b then a as hex."""
    a = b = 0
    for (word,) in struct.iter_unpack("<I", data):
        a = (a + word) & 0xFFFFFFFF
        b = (b + a) & 0xFFFFFFFF
    return f"{b:08x}{a:08x}"


def make_tiny_images(images):
    """tinybase and tiny: 16 MiB each, tiny's first half equal to tinybase's, so part of
    what the inner VM reads is redirected; both start with the boot sector. Content from a
    counter through SHA-256, so the blocks are distinct and not zero. Returns tiny's
    checksum as the boot sector prints it."""
    def blocks(seed, count):
        out = bytearray()
        for i in range(count):
            digest = hashlib.sha256(f"{seed}-{i}".encode()).digest()
            out += digest * 128  # 4 KiB
        return bytes(out)

    half = 2048  # 8 MiB in 4 KiB blocks
    shared = build_boot_sector(2 * half * 8) + blocks("shared", half)[512:]
    (images / "tinybase.raw").write_bytes(shared + blocks("tinybase", half))
    tiny = shared + blocks("tiny", half)
    (images / "tiny.raw").write_bytes(tiny)
    return checksum(tiny)


def prepare_data_disk(deb, quick):
    """The persistent disk: /var/lib/vmar in the guest."""
    stage = WORK / "data"
    shutil.rmtree(stage, ignore_errors=True)
    test = stage / "system-test"
    # Not /var/lib/vmar/images: the package must create that (the guest moves these in).
    images = stage / "staged-images"
    test.mkdir(parents=True)
    images.mkdir()
    shutil.copy2(deb, test / "vmar.deb")
    shutil.copy2(ROOT / "tools/system-test-guest.sh", test / "run.sh")
    shutil.copy2(ROOT / "tools/system-test-ops.sh", test / "ops.sh")
    shutil.copy2(ROOT / "tools/system-test-domain.xml", test / "domain.xml")
    shutil.copy2(ROOT / "tools/system-test-platform.sh", test / "platform.sh")
    (test / "tiny.sum").write_text(make_tiny_images(images) + "\n")
    if quick:
        (test / "quick").touch()
    data = WORK / "data.img"
    if data.exists():
        data.unlink()
    run(["mkfs.ext4", "-q", "-F", "-L", "vmar-data", "-d", str(stage), str(data), DATA_SIZE])
    return data


def boot(root_image, vmlinuz, initrd, data, timeout, memory):
    """Boots the guest on a fresh overlay of the cached root; it reboots once by itself and
    powers off at the end. Returns the serial console output and the wall time."""
    overlay = WORK / "run-root.qcow2"
    if overlay.exists():
        overlay.unlink()
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(root_image), "-F", "raw",
         str(overlay)])
    console = WORK / "console.log"
    accel = ["-enable-kvm", "-cpu", "host"] if guest.kvm_works() else ["-accel", "tcg", "-cpu", "max"]
    cmd = ["nice", "-n", "10", "qemu-system-x86_64", *accel, "-m", str(memory), "-smp", "2",
           "-display", "none", "-monitor", "none", "-serial", f"file:{console}", "-nic", "none",
           "-kernel", str(vmlinuz), "-initrd", str(initrd),
           "-drive", f"file={overlay},if=virtio,format=qcow2,cache=unsafe",
           "-drive", f"file={data},if=virtio,format=raw,cache=unsafe",
           "-append", ("root=/dev/vda rw console=ttyS0 quiet loglevel=3 systemd.show_status=0 "
                       # Under TCG on a loaded host the kernel's IO-APIC timer check can
                       # fail and panic.
                       "no_timer_check")]
    log(f"booting: {' '.join(cmd)}")
    started = time.monotonic()
    proc = subprocess.Popen(cmd)
    shown = 0
    timed_out = False
    while proc.poll() is None:
        time.sleep(2)
        shown = show_progress(console, shown)
        if time.monotonic() - started > timeout:
            timed_out = True
            proc.kill()
            proc.wait()
    show_progress(console, shown)
    output = console.read_text(errors="replace") if console.exists() else ""
    if timed_out:
        output += f"\nSYSTEM-TEST: FAIL guest timed out after {timeout} s\n"
    return output, time.monotonic() - started


def show_progress(console, shown):
    """Prints the guest's SYSTEM-TEST lines as they come, and the indented lines it prints
    for people (systemd-analyze security, the VM's console, vmarctl stats)."""
    if not console.exists():
        return shown
    lines = console.read_text(errors="replace").splitlines()
    for line in lines[shown:]:
        if "SYSTEM-TEST" in line or line.startswith("    "):
            print(line.rstrip("\r"), flush=True)
    return len(lines)


def promtool_checks(data):
    """The metrics the guest left on the data disk (vmarctl metrics, the textfile timer's
    file, before and after the reboot), checked with promtool on this host: the guest root
    gets no Prometheus. Returns SYSTEM-TEST result lines."""
    lines = ""
    for name in ["metrics.prom", "timer.prom", "metrics2.prom", "timer2.prom"]:
        out = WORK / name
        out.unlink(missing_ok=True)
        subprocess.run(["debugfs", "-R", f"dump /system-test/{name} {out}", str(data)],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
        if not out.exists() or out.stat().st_size == 0:
            lines += f"SYSTEM-TEST: FAIL promtool check metrics {name}: the guest left no {name}\n"
            continue
        check = subprocess.run(["promtool", "check", "metrics"], stdin=out.open("rb"),
                               capture_output=True, text=True, check=False)
        verdict = "ok" if check.returncode == 0 else "FAIL"
        lines += f"SYSTEM-TEST: {verdict} promtool check metrics {name} (host)\n"
        for problem in (check.stdout + check.stderr).splitlines():
            print(f"    promtool: {problem}")
    print(lines, end="")
    return lines


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--timeout", type=int, default=3600, help="whole guest run, seconds")
    parser.add_argument("--memory", type=int, default=2048, help="guest memory in MiB")
    parser.add_argument("--rebuild", action="store_true", help="rebuild the cached root")
    parser.add_argument("--quick", action="store_true", help="skip the inner VM")
    parser.add_argument("--deb", help="use this package instead of running tools/package.sh")
    parser.add_argument("--build-only", action="store_true",
                        help="only build (or find) the cached root file system")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("system-test: needs root (debootstrap, mkfs.ext4 -d)")

    ensure_tools()
    WORK.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    root_image, vmlinuz, initrd = build_root(args.rebuild)
    built = time.monotonic()
    if args.build_only:
        print(f"root file system: {root_image} ({built - started:.0f} s)")
        return
    if args.deb:
        deb = Path(args.deb)
    else:
        out = run([str(ROOT / "tools/package.sh")], capture_output=True, text=True).stdout
        deb = ROOT / out.strip().splitlines()[-1]
    data = prepare_data_disk(deb, args.quick)
    prepared = time.monotonic()
    output, seconds = boot(root_image, vmlinuz, initrd, data, args.timeout, args.memory)
    # The guest script's detailed log, from the data disk (debugfs reads ext4 unmounted).
    guest_log = WORK / "guest.log"
    subprocess.run(["debugfs", "-R", f"dump /system-test/log {guest_log}", str(data)],
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    print(f"SYSTEM-TEST: root file system {built - started:.0f} s, package and data disk "
          f"{prepared - built:.0f} s, guest {seconds:.0f} s wall time "
          f"(console: {WORK / 'console.log'}, details: {guest_log})")
    output += promtool_checks(data)
    results = re.findall(r"SYSTEM-TEST: (ok|FAIL) (.*)", output)
    passed = sum(1 for r, _ in results if r == "ok")
    failed = sum(1 for r, _ in results if r == "FAIL")
    if "SYSTEM-TEST: finished" not in output:
        print("SYSTEM-TEST: FAIL the guest did not finish its script")
        failed += 1
    if failed:
        print("failed:")
        for r, name in results:
            if r == "FAIL":
                print(f"  {name.strip()}")
    print(f"{passed} passed, {failed} failed")
    sys.exit(0 if failed == 0 and passed > 0 else 1)


if __name__ == "__main__":
    main()
