#!/usr/bin/env python3
"""Builds bootable raw VM images with debootstrap, for the instantiation experiment.

A base Debian OS and derived images with different application stacks, each a partitioned
raw disk (MBR, one Linux partition at 1 MiB) whose ext4 file system is filled from a root
tree with `mkfs.ext4 -d`, without mounting anything. Each image holds Debian's kernel and an
initramfs (initramfs-tools) in /boot, boots with systemd as init (QEMU boots the kernel and
initramfs of the image's tree directly, as a boot loader would load them: see
tools/trace-boot.py), and starts its application as a service. Two marker units write a line
to the serial console: `VMAR-OS-READY` once the OS is up (sshd and the gettys started) and
`VMAR-APP-READY` once the application answers (an HTTP request to nginx, `pg_isready`, ...).
The application's units are ordered after the first marker, so a boot splits cleanly into
an OS phase and an application phase.

The `web-*` images are a same-stack family: nginx and python3 like `web`, each debootstrapped
separately with a few other packages (a rebuild, extra tools), so that their file systems
are laid out independently, as catalogue images carrying one application stack are.

Trees and images are cached under work/images: a rerun only rebuilds what is missing or
whose configuration (packages, units) changed. Needs root (debootstrap), and installs
debootstrap and fdisk with apt-get if missing.

    tools/make-images.py [--size 3G] [--suite bookworm] [--mirror URL]
                      [--only NAME... | --all | --family]

Builds base, web, db and dev unless told otherwise; --all adds cache, php, node and mail;
--family builds the same-stack family (web and the web-* images).

Prints the image paths, in the order asked.
"""

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "work" / "images"

# What every image boots with: systemd, sshd, Debian's kernel and an initramfs.
OS = ["systemd-sysv", "udev", "openssh-server", "ca-certificates", "linux-image-amd64",
      "initramfs-tools", "zstd"]
WEB = ["nginx", "python3"]
# name -> packages on top of a minbase system (the base image has the OS only).
IMAGES = {
    "base": OS,
    "web": [*OS, *WEB],
    "db": [*OS, "postgresql"],
    "dev": [*OS, "build-essential", "git"],
    # More application stacks, for experiments with more than four images (--all).
    "cache": [*OS, "redis-server", "redis-tools"],
    "php": [*OS, "nginx", "php-fpm"],
    "node": [*OS, "nodejs"],
    "mail": [*OS, "postfix", "dovecot-imapd"],
    # The same-stack family (--family): web's stack, separately built and laid out.
    "web-rebuild": [*OS, *WEB, "less"],
    "web-tools": [*OS, *WEB, "curl", "vim-tiny", "rsync"],
    "web-ops": [*OS, *WEB, "git", "htop", "lsof", "procps"],
}
# What a run without --only or --all builds.
DEFAULT = ["base", "web", "db", "dev"]
FAMILY = ["web", "web-rebuild", "web-tools", "web-ops"]

# A bash script that succeeds once an image's application answers (the application marker
# runs it until it does), and the units the application is made of.
HTTP = r"""exec 3<>/dev/tcp/127.0.0.1/80 || exit 1
printf 'GET / HTTP/1.0\r\n\r\n' >&3
head -1 <&3 | grep -q ' 200 '
"""
APP_CHECK = {
    # sshd is part of the OS phase already (the OS marker is ordered after it).
    "base": ("exec 3<>/dev/tcp/127.0.0.1/22 && head -c 4 <&3 | grep -q SSH\n", []),
    "web": (HTTP, ["nginx.service"]),
    "db": ("pg_isready -q -h /var/run/postgresql\n",
           ["postgresql.service", "postgresql@15-main.service"]),
    "dev": (r"""printf '#include <stdio.h>\nint main(void) { puts("hi"); return 0; }\n' > /tmp/hello.c
cc -O2 -o /tmp/hello /tmp/hello.c && /tmp/hello && git --version
""", []),
    "cache": ("redis-cli ping | grep -q PONG\n", ["redis-server.service"]),
    "php": (HTTP + "test -S /run/php/php8.2-fpm.sock\n", ["nginx.service", "php8.2-fpm.service"]),
    "node": ("""node -e 'require("http").createServer().listen(8080, function () { this.close() })'
""", []),
    "mail": ("exec 3<>/dev/tcp/127.0.0.1/25 && head -c 3 <&3 | grep -q 220\n",
             ["postfix.service", "dovecot.service"]),
}
for _name in FAMILY[1:]:
    APP_CHECK[_name] = APP_CHECK["web"]

OS_MARKER = """[Unit]
Description=vmar: the OS is up (marker of the OS phase's end)
After=ssh.service getty.target systemd-user-sessions.service systemd-logind.service
Wants=ssh.service getty.target

[Service]
Type=oneshot
ExecStart=/bin/sh -c 'echo VMAR-OS-READY > /dev/ttyS0'

[Install]
WantedBy=multi-user.target
"""

APP_MARKER = """[Unit]
Description=vmar: the application answers (marker of the application phase's end)
After=vmar-os-ready.service {units}
Wants={units}

[Service]
Type=oneshot
TimeoutStartSec=900
ExecStart=/bin/bash -c 'until /usr/local/lib/vmar/app-check; do sleep 0.5; done; echo VMAR-APP-READY > /dev/ttyS0'

[Install]
WantedBy=multi-user.target
"""

# Every application unit starts after the OS marker (drop-in), so the phases do not overlap.
APP_DROPIN = """[Unit]
After=vmar-os-ready.service
"""

PARTITION_OFFSET = 1 << 20


def log(message):
    print(f"make-images: {message}", file=sys.stderr, flush=True)


def run(cmd, **kw):
    return subprocess.run(cmd, check=True, **kw)


def ensure_tools():
    missing = [pkg for tool, pkg in [("debootstrap", "debootstrap"), ("sfdisk", "fdisk")]
               if shutil.which(tool) is None]
    if missing:
        log(f"installing {' '.join(missing)}")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        run(["apt-get", "update", "-qq"], env=env)
        run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing], env=env)


def parse_size(text):
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    if text[-1:].upper() in units:
        return int(text[:-1]) * units[text[-1].upper()]
    return int(text)


def build_tree(name, packages, suite, mirror):
    tree = WORK / "trees" / name
    if (tree / ".vmar-done").exists():
        return tree
    log(f"debootstrap {name}: {' '.join(packages)}")
    shutil.rmtree(tree, ignore_errors=True)
    tree.parent.mkdir(parents=True, exist_ok=True)
    run(["debootstrap", "--variant=minbase", f"--include={','.join(packages)}", suite,
         str(tree), mirror], stdout=subprocess.DEVNULL)
    # Caches that differ from run to run and no VM needs.
    for cache in ["var/cache/apt/archives", "var/lib/apt/lists"]:
        for entry in (tree / cache).glob("*"):
            if entry.is_file():
                entry.unlink()
    (tree / ".vmar-done").touch()
    return tree


def configure(name, tree):
    """Makes the tree boot as a VM: fstab, hostname, the marker units and the application's
    ordering after the OS marker. Rewritten only when it changed, so that the image is
    rebuilt only then."""
    check, units = APP_CHECK[name]
    files = {
        "etc/fstab": "/dev/vda1 / ext4 errors=remount-ro 0 1\n",
        "etc/hostname": f"{name}\n",
        "etc/systemd/system/vmar-os-ready.service": OS_MARKER,
        "etc/systemd/system/vmar-app-ready.service": APP_MARKER.format(units=" ".join(units)),
        "usr/local/lib/vmar/app-check": "#!/bin/bash\n" + check,
        **{f"etc/systemd/system/{unit}.d/vmar-after-os.conf": APP_DROPIN for unit in units},
    }
    links = {f"etc/systemd/system/multi-user.target.wants/{unit}": f"/etc/systemd/system/{unit}"
             for unit in ["vmar-os-ready.service", "vmar-app-ready.service"]}
    digest = hashlib.sha256(repr(sorted({**files, **links}.items())).encode()).hexdigest()
    stamp = tree / ".vmar-config"
    if stamp.exists() and stamp.read_text() == digest:
        return
    log(f"configuring {name}")
    for stale in (tree / "etc/systemd/system").glob("*.d/vmar-after-os.conf"):
        stale.unlink()
    for path, text in files.items():
        dest = tree / path
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(text)
    (tree / "usr/local/lib/vmar/app-check").chmod(0o755)
    for path, target in links.items():
        (tree / path).unlink(missing_ok=True)
        (tree / path).parent.mkdir(parents=True, exist_ok=True)
        os.symlink(target, tree / path)
    if not list((tree / "boot").glob("initrd.img-*")):
        log(f"{name}: no initramfs in /boot, running update-initramfs")
        run(["chroot", str(tree), "update-initramfs", "-c", "-k", "all"],
            stdout=subprocess.DEVNULL)
    stamp.write_text(digest)


def build_image(name, tree, size):
    image = WORK / f"{name}.raw"
    newest = max((tree / stamp).stat().st_mtime for stamp in [".vmar-done", ".vmar-config"])
    if image.exists() and image.stat().st_mtime >= newest:
        return image
    log(f"mkfs.ext4 -d {tree.name} -> {image.name}")
    tmp = image.with_suffix(".tmp")
    tmp.unlink(missing_ok=True)
    with open(tmp, "wb") as f:
        f.truncate(size)
    sectors = (size - PARTITION_OFFSET) // 512
    run(["sfdisk", "--quiet", str(tmp)],
        input=f"label: dos\nstart=2048, size={sectors}, type=83\n".encode())
    fs_blocks = (size - PARTITION_OFFSET) // 4096
    run(["mkfs.ext4", "-q", "-F", "-b", "4096", "-L", name, "-E",
         f"offset={PARTITION_OFFSET}", "-d", str(tree), str(tmp), str(fs_blocks)])
    tmp.rename(image)
    return image


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="3G")
    parser.add_argument("--suite", default="bookworm")
    parser.add_argument("--mirror", default="http://deb.debian.org/debian")
    parser.add_argument("--only", nargs="*", choices=list(IMAGES))
    parser.add_argument("--all", action="store_true",
                        help=f"build {', '.join(n for n in IMAGES if n not in FAMILY[1:])}")
    parser.add_argument("--family", action="store_true",
                        help=f"build the same-stack family: {', '.join(FAMILY)}")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("make-images: debootstrap needs root")
    ensure_tools()
    size = parse_size(args.size)
    if args.only:
        names = args.only
    elif args.all:
        names = [n for n in IMAGES if n not in FAMILY[1:]]
    else:
        names = FAMILY if args.family else DEFAULT
    for name in names:
        tree = build_tree(name, IMAGES[name], args.suite, args.mirror)
        configure(name, tree)
        print(build_image(name, tree, size))


if __name__ == "__main__":
    main()
