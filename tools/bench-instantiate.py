#!/usr/bin/env python3
"""The paper's experiment on a real kernel: N VMs start together from different images that
share content, with and without vmar; wall time, bytes read from disk and page cache used.

Builds (cached) the realistic images of tools/make-images.py, a guest disk holding them (ext4
filled with `mkfs.ext4 -d`), and for each image the list of files its boot and its
application read (the boot's executables and data, the application's, and the shared
libraries both load, found with `ldd` inside the image's root tree). Then boots Debian's
kernel in QEMU (tools/guest.py) with the disk attached as virtio (`cache=none`, so the host's
page cache does not serve the guest's disk), where devtools/src/bin/instantiate-guest.rs captures the
images with vmard, and for N = 1, 2, 4 and each mode mounts the images' ext4 read-only from
the block device and reads the listed files with O_DIRECT from a cold cache: `plain` through
buffered read-only loop devices of the image files, `vmar` through /dev/mapper/vmar-NAME.

    tools/bench-instantiate.py [--workload files|trace] [--rounds 3] [--ns 1,2,4]
                            [--memory 3072] [--disk-mbps 0] [--disk-iops 0]
                            [--plot docs/instantiate.svg] [--json FILE]

`--workload trace` replaces the file lists with the reads real boots of the images made
(tools/trace-boot.py: bootable images, every guest read of its disk recorded by QEMU, split at
the images' serial markers into an OS phase and an application phase). In the guest, for
each set of images (`main`: base, web, db, dev; `family`: web and the web-* images, one
application stack built four times), each N and each path, N processes start together, each
in its own cgroup, and replay their image's OS phase from a cold cache, then its application
phase, in order with O_DIRECT at the queue depth the guest used: `plain` (buffered read-only
loop devices of the image files), `vmar` (/dev/mapper/vmar-NAME), and libvirt's path, a qcow2
overlay over the raw image file (`qemu-plain`) or over the vmar device (`qemu-vmar`) read by
QEMU's block layer with cache=none (qemu-io -t none). Prints, per set, phase and N: wall time,
bytes and requests read from the disk, page-cache growth, the traces' content bound (unique
non-zero 4 KiB blocks by content, which no redirection can read less of) and the ratios.

With --paths naming prefetch paths (plain+prefetch, vmar+prefetch, vmar+prefetch-during,
vmar+prefetch-gap0), the guest first records each image's working set per phase with vmard
(`vmarctl record` after a replay of that image alone on its vmar device), then each round
prefetches before each phase (vmarctl warm of the N devices, or each image's own set from
its own file for plain+prefetch) and counts the prefetch in the phase's time; the prefetch's
and the replays' bytes and requests are reported apart.

Prints a table of medians over the rounds, with the vmar/plain ratios, and writes every run
to --results (default work/instantiate/results.json). --disk-mbps throttles the guest's disk (QEMU throttling) to
model slower image storage; 0 (default) leaves it as fast as the host's disk.
"""

import argparse
import hashlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

sys.dont_write_bytecode = True
import guest

ROOT = guest.ROOT
WORK = ROOT / "work" / "instantiate"
# The guest side of the benchmark (devtools/src/bin/instantiate-guest.rs): how cargo builds
# it, and the artifact's name. The one place to change if it moves.
GUEST_PROGRAM = (["build", "-p", "vmar-devtools", "--bin", "instantiate-guest"], "instantiate-guest")
# Sets of images for the trace workload: N images of a set are its first N.
# `mixed` is a catalog of eight: the main four, the family's three other builds of the web
# stack and one more stack (cache); it is what N = 8 starts. Its first four are `main`,
# which the guest does not run twice (the report shows main's figures there).
TRACE_SETS = {"main": ["base", "web", "db", "dev"],
              "family": ["web", "web-rebuild", "web-tools", "web-ops"],
              "mixed": ["base", "web", "db", "dev", "web-rebuild", "web-tools", "web-ops",
                        "cache"]}
TRACE_PATHS = ["plain", "vmar", "qemu-plain", "qemu-vmar"]
# Paths with prefetch of the working sets vmard records in a recording pass (not run unless
# named with --paths): each round's time includes the prefetch. `plain+prefetch` reads each
# image's own set from its own file (the baseline), `vmar+prefetch` has vmard warm the N
# devices' union before the replays, `-during` beside them, `-gap0` with
# prefetch_merge_gap = 0.
PREFETCH_PATHS = ["plain+prefetch", "vmar+prefetch", "vmar+prefetch-during",
                  "vmar+prefetch-gap0"]
ALL_PATHS = TRACE_PATHS + PREFETCH_PATHS
PHASES = ["os", "app"]
# QEMU's tools the guest runs for the qemu-* paths (copied with their libraries).
QEMU_TOOLS = ["qemu-io", "qemu-img"]
# Capture order; N images are the first N. The last four are built only for N > 4.
IMAGES = ["base", "web", "db", "dev", "cache", "php", "node", "mail"]
MODULES = [*guest.MODULES, "virtio_pci", "virtio_blk", "ext4", "crc32c_generic"]

# What a boot of every image reads: init, journald, udev with its rules and hwdb, logind,
# sshd, a getty and a login shell, their shared libraries, unit files and /etc.
BOOT_EXECUTABLES = [
    "/usr/lib/systemd/systemd", "/usr/lib/systemd/systemd-journald", "/usr/bin/udevadm",
    "/usr/lib/systemd/systemd-logind", "/usr/lib/systemd/systemd-networkd",
    "/usr/lib/systemd/systemd-resolved", "/usr/lib/systemd/systemd-timesyncd",
    "/usr/bin/systemctl", "/usr/bin/systemd-tmpfiles", "/usr/lib/systemd/systemd-sysctl",
    "/usr/sbin/sshd", "/usr/sbin/agetty", "/usr/bin/login", "/usr/bin/bash", "/usr/bin/mount",
    "/usr/bin/dbus-daemon", "/usr/sbin/cron",
]
BOOT_DATA = [
    "/usr/lib/udev/hwdb.bin", "/usr/lib/udev/rules.d/*", "/usr/lib/systemd/system/*",
    "/usr/lib/systemd/system-generators/*", "/etc/**/*",
]
# What each image's application reads when it starts, besides the boot.
APP_EXECUTABLES = {
    "base": ["/usr/bin/ssh-keygen", "/usr/lib/openssh/sftp-server", "/usr/bin/ls",
             "/usr/bin/grep", "/usr/bin/tar", "/usr/bin/gzip", "/usr/bin/ps"],
    "web": ["/usr/sbin/nginx", "/usr/bin/python3.11"],
    "db": ["/usr/lib/postgresql/15/bin/postgres", "/usr/lib/postgresql/15/bin/pg_ctl",
           "/usr/lib/postgresql/15/bin/initdb", "/usr/bin/psql"],
    "dev": ["/usr/bin/x86_64-linux-gnu-gcc-12", "/usr/lib/gcc/x86_64-linux-gnu/12/cc1",
            "/usr/lib/gcc/x86_64-linux-gnu/12/collect2", "/usr/bin/x86_64-linux-gnu-as",
            "/usr/bin/x86_64-linux-gnu-ld.bfd", "/usr/bin/git", "/usr/bin/make"],
    "cache": ["/usr/bin/redis-server", "/usr/bin/redis-cli"],
    "php": ["/usr/sbin/nginx", "/usr/sbin/php-fpm8.2"],
    "node": ["/usr/bin/node"],
    "mail": ["/usr/sbin/postfix", "/usr/lib/postfix/sbin/master", "/usr/lib/postfix/sbin/smtpd",
             "/usr/lib/postfix/sbin/qmgr", "/usr/lib/postfix/sbin/pickup", "/usr/sbin/dovecot",
             "/usr/lib/dovecot/imap", "/usr/lib/dovecot/imap-login"],
}
APP_DATA = {
    "base": ["/usr/lib/openssh/*"],
    "web": ["/usr/lib/nginx/modules/*", "/usr/share/nginx/html/*",
            "/usr/lib/python3.11/__pycache__/*.pyc",
            *[f"/usr/lib/python3.11/{p}/__pycache__/*.pyc"
              for p in ["encodings", "collections", "importlib", "json", "http", "email",
                        "urllib", "logging", "asyncio", "concurrent/futures"]],
            "/usr/lib/python3.11/lib-dynload/*.so"],
    "db": ["/usr/lib/postgresql/15/lib/*.so", "/usr/share/postgresql/15/*",
           "/usr/share/postgresql/15/timezonesets/*", "/usr/share/zoneinfo/Etc/UTC"],
    "dev": ["/usr/lib/gcc/x86_64-linux-gnu/12/crt*.o", "/usr/lib/gcc/x86_64-linux-gnu/12/libgcc.a",
            "/usr/lib/gcc/x86_64-linux-gnu/12/libgcc_s.so",
            "/usr/lib/gcc/x86_64-linux-gnu/12/liblto_plugin.so", "/usr/include/*.h",
            "/usr/include/x86_64-linux-gnu/bits/*.h", "/usr/include/x86_64-linux-gnu/sys/*.h",
            "/usr/include/x86_64-linux-gnu/gnu/*.h", "/usr/lib/x86_64-linux-gnu/crt*.o",
            "/usr/lib/x86_64-linux-gnu/libc.so", "/usr/lib/x86_64-linux-gnu/libc_nonshared.a"],
    "cache": [],
    "php": ["/usr/lib/nginx/modules/*", "/usr/lib/php/2022*/*.so"],
    "node": ["/usr/share/nodejs/*/package.json"],
    "mail": ["/usr/lib/postfix/*.so", "/usr/lib/dovecot/modules/*.so",
             "/usr/lib/dovecot/libdovecot*.so*"],
}

# What /init does once the guest is up (tools/guest.py: modules loaded, udev running).
INIT = """mkdir -p /images /mnt/bench
mount -t cgroup2 cgroup2 /sys/fs/cgroup
mount -t ext4 -o ro /dev/vda /images || echo "BENCH-FAILED: cannot mount /dev/vda"
echo "BENCH: booted $(uname -r) in $(cut -d' ' -f1 /proc/uptime) s"
RUST_LOG=warn /vmar/bin/vmard --image-root /images --state-dir /tmp/state \\
    --socket /run/vmard.sock > /tmp/vmard.log 2>&1 &
for i in $(seq 100); do [ -S /run/vmard.sock ] && break; sleep 0.2; done
export PATH=/vmar/bin:$PATH
{setup}/vmar/bin/instantiate-guest --images /images --lists /bench/lists --names {names} \\
    --ns {ns} --rounds {rounds} --vmarctl /vmar/bin/vmarctl --socket /run/vmard.sock {extra} \\
    && echo "BENCH-DONE" || {{ echo "BENCH-FAILED"; cat /tmp/vmard.log; }}
/vmar/bin/vmarctl --socket /run/vmard.sock stats | sed 's/^/STATS: /'

sync
poweroff -f
"""


def log(message):
    print(f"bench-instantiate: {message}", file=sys.stderr, flush=True)


def inside(tree, path):
    """`path` of the image's root file system, with symlinks resolved inside `tree` (as a
    chroot would); None when it does not exist."""
    parts = [p for p in path.split("/") if p]
    resolved = []
    for _ in range(64):
        if not parts:
            full = tree.joinpath(*resolved)
            return full if full.exists() else None
        part = parts.pop(0)
        if part == "..":
            resolved = resolved[:-1]
            continue
        candidate = tree.joinpath(*resolved, part)
        if candidate.is_symlink():
            target = os.readlink(candidate)
            if target.startswith("/"):
                resolved = []
            parts = [p for p in target.split("/") if p] + parts
        else:
            resolved.append(part)
    return None


def libraries(tree, executables):
    """Shared libraries the executables load, as `ldd` run inside the tree lists them."""
    if not executables:
        return []
    # ldd fails for a static executable among them; what it found of the others counts.
    out = subprocess.run(["chroot", str(tree), "/usr/bin/ldd", *executables],
                         capture_output=True, text=True, check=False).stdout
    return re.findall(r"(/\S+) \(0x", out)


def file_list(tree, name):
    executables = [e for e in BOOT_EXECUTABLES + APP_EXECUTABLES[name] if inside(tree, e)]
    paths = executables + libraries(tree, executables)
    for pattern in BOOT_DATA + APP_DATA[name]:
        paths += ["/" + str(p.relative_to(tree)) for p in tree.glob(pattern.lstrip("/"))]
    files, seen = [], set()
    for path in paths:
        full = inside(tree, path)
        if full is None or not full.is_file() or full.stat().st_size == 0:
            continue
        relative = "/" + str(full.relative_to(tree))
        if relative not in seen:
            seen.add(relative)
            files.append(relative)
    return files


def build_lists(names):
    lists = WORK / "lists"
    lists.mkdir(parents=True, exist_ok=True)
    for name in names:
        tree = ROOT / "work/images/trees" / name
        files = file_list(tree, name)
        size = sum((tree / f.lstrip("/")).stat().st_size for f in files)
        log(f"{name}: {len(files)} files, {size / 2**20:.1f} MiB to read")
        (lists / f"{name}.list").write_text("\n".join(files) + "\n")
    return lists


def build_disk(images):
    """An ext4 image holding the raw images, rebuilt when the set changed or one of them is
    newer."""
    disk, stamp = WORK / "disk.raw", WORK / "disk.images"
    names = "\n".join(i.name for i in images)
    if disk.exists() and stamp.exists() and stamp.read_text() == names and \
            all(disk.stat().st_mtime >= i.stat().st_mtime for i in images):
        return disk
    log("building the guest disk with the images (mkfs.ext4 -d)")
    source = WORK / "disk-src"
    shutil.rmtree(source, ignore_errors=True)
    source.mkdir(parents=True)
    for image in images:
        os.link(image, source / image.name)
    tmp = disk.with_suffix(".tmp")
    tmp.unlink(missing_ok=True)
    size = sum(i.stat().st_size for i in images) + (1 << 30)
    with open(tmp, "wb") as f:
        f.truncate(size)
    guest.run(["mkfs.ext4", "-q", "-F", "-L", "vmar-images", "-d", str(source), str(tmp)])
    tmp.rename(disk)
    stamp.write_text(names)
    shutil.rmtree(source)
    return disk


def median_runs(runs):
    table = {}
    for (mode, n) in sorted({(r["mode"], r["n"]) for r in runs}, key=lambda k: (k[1], k[0])):
        chosen = [r for r in runs if r["mode"] == mode and r["n"] == n]
        table[(mode, n)] = {
            key: statistics.median(r[key] for r in chosen)
            for key in ["seconds", "disk_bytes_read", "disk_reads", "cached_bytes"]
        }
        table[(mode, n)]["rounds"] = len(chosen)
        table[(mode, n)]["file_bytes"] = sum(v["file_bytes"] for v in chosen[0]["vms"])
        if "vmar_stats" in chosen[0]:
            table[(mode, n)]["vmar_stats"] = chosen[-1]["vmar_stats"]
    return table


def dedup_bound(names, lists):
    """For each N: the unique 4 KiB blocks (by content) of the files the first N images
    read, over all their blocks. No redirection can read fewer bytes than this share."""
    seen, total, unique, bounds = set(), 0, 0, {}
    for n, name in enumerate(names, 1):
        tree = ROOT / "work/images/trees" / name
        for path in (lists / f"{name}.list").read_text().split():
            with open(tree / path.lstrip("/"), "rb") as f:
                while block := f.read(4096):
                    total += 1
                    digest = hashlib.blake2b(block.ljust(4096, b"\0")).digest()
                    if digest not in seen:
                        seen.add(digest)
                        unique += 1
        bounds[n] = unique / total
    return bounds


def print_table(table, ns, bounds):
    mib = 2 ** 20
    print(f"{'N':>2} {'files MiB':>9} | {'plain s':>8} {'vmar s':>8} {'time':>6} | "
          f"{'plain MiB':>9} {'vmar MiB':>9} {'bytes':>6} {'bound':>6} | {'plain cache':>11} "
          f"{'vmar cache':>10} {'cache':>6} | sharing (all devices)")
    for n in ns:
        p, v = table.get(("plain", n)), table.get(("vmar", n))
        if not p or not v:
            continue
        ratio = lambda a, b: f"{a / b:.2f}" if b else "-"
        share = v.get("vmar_stats", {}).get("sharing_factor")
        bounds = {int(k): b for k, b in bounds.items()}
        print(f"{n:>2} {p['file_bytes'] / mib:>9.1f} | {p['seconds']:>8.2f} {v['seconds']:>8.2f} "
              f"{ratio(v['seconds'], p['seconds']):>6} | {p['disk_bytes_read'] / mib:>9.1f} "
              f"{v['disk_bytes_read'] / mib:>9.1f} "
              f"{ratio(v['disk_bytes_read'], p['disk_bytes_read']):>6} "
              f"{bounds.get(n, float('nan')):>6.2f} | "
              f"{p['cached_bytes'] / mib:>11.1f} {v['cached_bytes'] / mib:>10.1f} "
              f"{ratio(v['cached_bytes'], p['cached_bytes']):>6} | "
              f"{share if share is None else f'{share:.2f}'}")


def ensure_matplotlib():
    """Installs Debian's python3-matplotlib when missing."""
    if shutil.which("dpkg-query") and subprocess.run(
            ["dpkg-query", "-W", "-f=${Status}", "python3-matplotlib"],
            capture_output=True, text=True, check=False).stdout.find("installed") < 0:
        log("installing python3-matplotlib for the plot")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        guest.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends",
                   "python3-matplotlib"], env=env, stdout=subprocess.DEVNULL)


def pyplot(results, path):
    """matplotlib's pyplot (Agg), from Debian's python3-matplotlib (installed if missing);
    None when this interpreter (e.g. a pyenv one) cannot import it, after /usr/bin/python3
    made the plot of `results` at `path` instead."""
    try:
        import matplotlib
    except ImportError:
        ensure_matplotlib()
        if sys.executable != "/usr/bin/python3":
            guest.run(["/usr/bin/python3", __file__, "--plot-only", str(results),
                       "--plot", str(path)])
            return None
        import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def disk_label(data):
    """How the guest's disk was throttled in the run of `data`, for a plot's title."""
    limits = [f"{data['disk_mbps']} MB/s" if data["disk_mbps"] else "",
              f"{data['disk_iops']} IOPS" if data["disk_iops"] else ""]
    return "disk " + " ".join(x for x in limits if x) if any(limits) else "disk not throttled"


def save_plot(fig, path):
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    log(f"plot written to {path}")


def plot(results, path):
    """Plots time and bytes read against N from a results file. Uses Debian's
    python3-matplotlib (installed if missing), under /usr/bin/python3 when this interpreter
    (e.g. a pyenv one) cannot import it."""
    plt = pyplot(results, path)
    if plt is None:
        return
    data = json.loads(results.read_text())
    table = median_runs(data["runs"])
    ns = sorted({n for (_, n) in table if ("plain", n) in table and ("vmar", n) in table})
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6))
    for mode, style in [("plain", "o-"), ("vmar", "s-")]:
        left.plot(ns, [table[(mode, n)]["seconds"] for n in ns], style, label=mode)
        right.plot(ns, [table[(mode, n)]["disk_bytes_read"] / 2**20 for n in ns], style,
                   label=mode)
    left.set(xlabel="images started together (N)", ylabel="wall time (s)", xticks=ns)
    right.set(xlabel="images started together (N)", ylabel="MiB read from disk", xticks=ns)
    for ax in (left, right):
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend()
    disk = disk_label(data)
    fig.suptitle(f"cold start of N VMs, median of {data['rounds']} rounds "
                 f"(QEMU TCG guest, {disk})", fontsize=9)
    save_plot(fig, path)


def report(results, plot_path):
    data = json.loads(results.read_text())
    table = median_runs(data["runs"])
    print_table(table, sorted({n for (_, n) in table}), data["dedup_bound"])
    if plot_path:
        plot(results, plot_path)


def trace_files(names):
    """Writes NAME.PHASE.trace (a line `qd K`, then `OFFSET BYTES` per read) from the cached
    traces of tools/trace-boot.py; returns them as guest path -> host path."""
    guest.run([str(ROOT / "tools/trace-boot.py"), "--only", *names])
    out = WORK / "traces"
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    for name in names:
        data = json.loads((ROOT / "work/traces" / f"{name}.json").read_text())
        for phase in PHASES:
            p = data["phases"][phase]
            path = out / f"{name}.{phase}.trace"
            path.write_text(f"qd {p['queue_depth']}\n" + "".join(
                f"{offset} {size}\n" for _, offset, size in p["reads"]))
            files[f"/bench/traces/{name}.{phase}.trace"] = path
    return files


def trace_blocks(name, phase):
    """Distinct 4 KiB blocks (by address) of one image's traced phase, each read widened to
    4 KiB as the replay does."""
    data = json.loads((ROOT / "work/traces" / f"{name}.json").read_text())
    blocks = set()
    for _, offset, size in data["phases"][phase]["reads"]:
        blocks.update(range(offset // 4096, (offset + size + 4095) // 4096))
    return blocks


def block_digests(name, blocks):
    """Content digests of an image's blocks, all-zero blocks left out (vmar maps them to
    the zero target: they are never read)."""
    zero, out = bytes(4096), set()
    with open(ROOT / "work/images" / f"{name}.raw", "rb") as f:
        for block in sorted(blocks):
            f.seek(block * 4096)
            data = f.read(4096).ljust(4096, b"\0")
            if data != zero:
                out.add(hashlib.blake2b(data, digest_size=16).digest())
    return out


def block_runs(blocks):
    """Maximal runs of consecutive block numbers: what one request each can read at best."""
    runs, last = 0, None
    for block in sorted(blocks):
        if last is None or block != last + 1:
            runs += 1
        last = block
    return runs


def trace_floors(ns):
    """Per set, N > 1 and phase, from the traces and the images: the blocks and runs of
    consecutive blocks (what one request each could read, merged perfectly) each image reads that it did not read in its OS phase (what plain
    reads, image by image), and of those the blocks whose content no earlier image of the
    set read in this phase or the OS phase (what any redirection must still read). Under an
    IOPS limit time follows requests, and a run of new content costs a request however
    small; the others' new content is the part sharing cannot remove."""
    print("\nwhat the traces read: 4 KiB blocks / runs of consecutive blocks, summed over "
          "the set's images; 'new' = content no earlier image of the set read")
    print(f"{'set':<7} {'N':>2} {'phase':<5} {'own blocks/runs':>17} {'new blocks/runs':>16} "
          f"{'first image new':>15} {'others new':>12} | new/own runs")
    for label, names in TRACE_SETS.items():
        for n in ns:
            if n < 2 or n > len(names):
                continue
            seen_blocks = {name: set() for name in names[:n]}
            seen_content = set()
            for phase in PHASES:
                own, new, content = [], [], set()
                for name in names[:n]:
                    blocks = trace_blocks(name, phase) - seen_blocks[name]
                    seen_blocks[name] |= blocks
                    fresh = set()
                    zero = bytes(4096)
                    with open(ROOT / "work/images" / f"{name}.raw", "rb") as f:
                        for block in sorted(blocks):
                            f.seek(block * 4096)
                            data = f.read(4096).ljust(4096, b"\0")
                            if data == zero:
                                continue
                            digest = hashlib.blake2b(data, digest_size=16).digest()
                            if digest not in seen_content and digest not in content:
                                fresh.add(block)
                            content.add(digest)
                    own.append((len(blocks), block_runs(blocks)))
                    new.append((len(fresh), block_runs(fresh)))
                seen_content |= content
                total = lambda xs: (sum(x[0] for x in xs), sum(x[1] for x in xs))
                (ob, orr), (nb, nr), (ab, ar) = total(own), total(new), total(new[1:])
                print(f"{label:<7} {n:>2} {phase:<5} {f'{ob}/{orr}':>17} {f'{nb}/{nr}':>16} "
                      f"{f'{new[0][0]}/{new[0][1]}':>15} {f'{ab}/{ar}':>12} | "
                      f"{nr / orr if orr else 0:.2f}")


def trace_bounds(ns):
    """Per set, N and phase: `distinct`, the bytes of the distinct blocks the N traces read
    (what plain reads at least: each image's own cache), and `content`, the bytes of their
    distinct non-zero contents (what any redirection reads at least). The application phase
    counts only what the OS phase did not already read, since it runs on the OS phase's
    cache."""
    bounds = {}
    for label, names in TRACE_SETS.items():
        for n in ns:
            if n > len(names):
                continue
            seen_blocks = {name: set() for name in names[:n]}
            seen_content = set()
            for phase in PHASES:
                distinct, content = 0, set()
                for name in names[:n]:
                    blocks = trace_blocks(name, phase) - seen_blocks[name]
                    distinct += len(blocks)
                    seen_blocks[name] |= blocks
                    content |= block_digests(name, blocks)
                fresh = content - seen_content
                seen_content |= content
                bounds[f"{label}/{n}/{phase}"] = {"distinct": distinct * 4096,
                                                  "content": len(fresh) * 4096}
    return bounds


def trace_table(data):
    """Medians over rounds per (set, phase, N, path). A set's N that the guest did not run
    because another set starts the same N images takes that set's figures."""
    table = {}
    keys = {(r["set"], r["phase"], r["n"], r["mode"]) for r in data["runs"]}
    for key in keys:
        chosen = [r for r in data["runs"] if (r["set"], r["phase"], r["n"], r["mode"]) == key]
        table[key] = {k: statistics.median(r[k] for r in chosen)
                      for k in ["seconds", "disk_bytes_read", "disk_reads", "cached_bytes",
                                "trace_bytes"]}
        times = [r["seconds"] for r in chosen]
        table[key]["spread"] = (max(times) - min(times)) / statistics.median(times)
        table[key]["min"], table[key]["max"] = min(times), max(times)
        table[key]["rounds"] = len(chosen)
        if all("prefetch" in r for r in chosen):
            fetch = [r["prefetch"] for r in chosen]
            table[key]["prefetch"] = {
                k: statistics.median(f[k] or 0 for f in fetch)
                for k in ["seconds", "disk_bytes_read", "disk_reads"]}
            table[key]["prefetch"]["requests"] = statistics.median(
                f["report"].get("requests", 0) for f in fetch)
            table[key]["prefetch"]["gap_bytes"] = statistics.median(
                f["report"].get("gap_bytes", 0) for f in fetch)
            # What the sets hold: vmar's union of canonical extents (each shared block
            # once), or the sum of the images' own sets for plain+prefetch.
            table[key]["prefetch"]["set_bytes"] = statistics.median(
                f["report"].get("union_bytes", f["report"].get("set_bytes", 0)) for f in fetch)
        if all("replay" in r for r in chosen):
            table[key]["replay"] = {
                k: statistics.median(r["replay"][k] for r in chosen)
                for k in ["seconds", "disk_bytes_read", "disk_reads"]}
    sets = data.get("sets", TRACE_SETS)
    for label, names in sets.items():
        for other, members in sets.items():
            for (s, phase, n, path), row in list(table.items()):
                if (s == other != label and n <= len(names) and members[:n] == names[:n]
                        and (label, phase, n, path) not in table):
                    table[(label, phase, n, path)] = row
    return table


def pooled(paths):
    """Trace results of several runs of the same images as one: their rounds pooled (each
    round's runs keep their figures; medians are over all of them)."""
    data = json.loads(paths[0].read_text())
    for path in paths[1:]:
        more = json.loads(path.read_text())
        if (more["disk_mbps"], more["disk_iops"]) != (data["disk_mbps"], data["disk_iops"]):
            sys.exit(f"bench-instantiate: {path} ran on another disk throttle")
        offset = data["rounds"]
        for r in more["runs"]:
            data["runs"].append({**r, "round": r["round"] + offset})
        data["rounds"] += more["rounds"]
        data["recordings"] = data.get("recordings", []) + more.get("recordings", [])
        for key, bound in more["bounds"].items():
            data["bounds"].setdefault(key, bound)
    return data


def covered_sets(sets):
    """Sets whose images are the first ones of a larger set (their figures are in it)."""
    return {a for a, m in sets.items() for b, o in sets.items()
            if a != b and len(m) < len(o) and o[:len(m)] == m}


def trace_report(data):
    table = trace_table(data)
    mib = 2 ** 20
    ratio = lambda a, b: f"{a / b:.2f}" if b else "-"
    summary = {}
    sets = data.get("sets", TRACE_SETS)
    for label in sets:
        for phase in PHASES:
            ns = sorted({n for (s, p, n, _) in table if s == label and p == phase})
            if not ns:
                continue
            print(f"\nset {label} ({', '.join(sets[label])}), {phase} phase")
            print(f"{'N':>2} {'path':<20} {'r':>2} {'time s':>7} {'range s':>13} {'MiB read':>9} "
                  f"{'requests':>8} {'cache MiB':>9} | {'time/plain':>10} {'MiB/plain':>9} "
                  f"{'MiB/bound':>9} {'time/p+pf':>9} {'MiB/p+pf':>8} | prefetch s, MiB/requests; "
                  f"replays MiB/requests")
            for n in ns:
                bound = data["bounds"].get(f"{label}/{n}/{phase}", {})
                plain = table.get((label, phase, n, "plain"))
                qplain = table.get((label, phase, n, "qemu-plain"))
                pplain = table.get((label, phase, n, "plain+prefetch"))
                for path in ALL_PATHS:
                    r = table.get((label, phase, n, path))
                    if not r:
                        continue
                    ref = qplain if path.startswith("qemu") else plain
                    versus, versus_bytes = "-", "-"
                    if pplain and path.startswith("vmar"):
                        versus = ratio(r["seconds"], pplain["seconds"])
                        versus_bytes = ratio(r["disk_bytes_read"], pplain["disk_bytes_read"])
                    fetch = ""
                    if "prefetch" in r:
                        f = r["prefetch"]
                        fetch = (f"{f['seconds']:.2f} s, {f['disk_bytes_read'] / mib:.1f}/"
                                 f"{f['disk_reads']:.0f} (sets {f['set_bytes'] / mib:.1f}, "
                                 f"gaps {f['gap_bytes'] / mib:.1f})")
                    if "replay" in r:
                        fetch += (f"; {r['replay']['disk_bytes_read'] / mib:.1f}/"
                                  f"{r['replay']['disk_reads']:.0f}")
                    print(f"{n:>2} {path:<20} {r['rounds']:>2} {r['seconds']:>7.2f} "
                          f"{r['min']:>6.2f}-{r['max']:<6.2f} "
                          f"{r['disk_bytes_read'] / mib:>9.1f} {r['disk_reads']:>8.0f} "
                          f"{r['cached_bytes'] / mib:>9.1f} | "
                          f"{ratio(r['seconds'], ref['seconds']) if ref else '-':>10} "
                          f"{ratio(r['disk_bytes_read'], ref['disk_bytes_read']) if ref else '-':>9} "
                          f"{ratio(r['disk_bytes_read'], bound.get('content', 0)):>9} "
                          f"{versus:>9} {versus_bytes:>8} | {fetch}")
                    summary[f"{label}/{n}/{phase}/{path}"] = r
                print(f"{n:>2} {'traces':<20} {'':>2} {'':>7} {'':>13} "
                      f"{bound.get('distinct', 0) / mib:>9.1f} "
                      f"{'':>8} {'':>9} | distinct blocks; content bound "
                      f"{bound.get('content', 0) / mib:.1f} MiB")
    records = data.get("recordings", [])
    if records:
        print("\nworking sets recorded by vmard (replay of each image alone, cold cache)")
        print(f"{'image':<12} {'phase':<5} {'replayed MiB':>12} {'read areas MiB':>14} "
              f"{'recorded MiB':>12} {'set MiB/runs':>13}")
        for r in records:
            res = r["result"]
            print(f"{r['record']:<12} {r['phase']:<5} {r['replay_bytes'] / mib:>12.1f} "
                  f"{res['read_area_bytes'] / mib:>14.1f} {res['recorded_bytes'] / mib:>12.1f} "
                  f"{res['set']['bytes'] / mib:>8.1f}/{res['set']['runs']}")
    return summary


def trace_plot(results, path):
    """Plots, per set and phase, wall time and bytes read against N for every path, with
    the content bound. Uses matplotlib like plot()."""
    plt = pyplot(results, path)
    if plt is None:
        return
    data = json.loads(results.read_text())
    table = trace_table(data)
    sets = data["sets"]
    shown = [label for label in sets if label not in covered_sets(sets)]
    widest = max(shown, key=lambda label: len(sets[label]))
    panels = [(label, phase) for label in shown for phase in PHASES
              if label == widest or phase == "app"]
    panels = [(lb, ph) for lb, ph in panels if any(k[:2] == (lb, ph) for k in table)]
    fig, axes = plt.subplots(2, len(panels), figsize=(3.4 * len(panels), 6), squeeze=False)
    styles = {"plain": "o-", "vmar": "s-", "qemu-plain": "o--", "qemu-vmar": "s--",
              "plain+prefetch": "o:", "vmar+prefetch": "s:", "vmar+prefetch-during": "^:",
              "vmar+prefetch-gap0": "v:"}
    for col, (label, phase) in enumerate(panels):
        ns = sorted({k[2] for k in table if k[:2] == (label, phase)})
        for mode, style in styles.items():
            if not all((label, phase, n, mode) in table for n in ns):
                continue
            axes[0][col].plot(ns, [table[(label, phase, n, mode)]["seconds"] for n in ns],
                              style, label=mode)
            axes[1][col].plot(ns, [table[(label, phase, n, mode)]["disk_bytes_read"] / 2**20
                                   for n in ns], style, label=mode)
        bound = [data["bounds"].get(f"{label}/{n}/{phase}", {}).get("content", 0) / 2**20
                 for n in ns]
        axes[1][col].plot(ns, bound, "k:", label="content bound")
        axes[0][col].set(title=f"{label}: {phase} phase", ylabel="wall time (s)", xticks=ns)
        axes[1][col].set(xlabel="images started together (N)", ylabel="MiB read from disk",
                         xticks=ns)
    for ax in [a for row in axes for a in row]:
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    disk = disk_label(data)
    fig.suptitle(f"replayed boot traces of N VMs started together, median of "
                 f"{data['rounds']} rounds (QEMU TCG guest, {disk})", fontsize=9)
    save_plot(fig, path)


def guest_drive(disk, args):
    """QEMU's -drive for the guest's disk of image files: read-only, O_DIRECT on the host,
    throttled as --disk-mbps and --disk-iops ask."""
    drive = f"file={disk},if=virtio,format=raw,readonly=on,cache=none,aio=native"
    if args.disk_mbps:
        drive += f",throttling.bps-read={args.disk_mbps * 1000 * 1000}"
    if args.disk_iops:
        drive += f",throttling.iops-read={args.disk_iops}"
    return drive


def run_trace(args, ns):
    if os.geteuid() != 0:
        sys.exit("bench-instantiate: needs root (debootstrap, QEMU)")
    if args.set:
        TRACE_SETS.clear()
        for spec in args.set:
            label, _, members = spec.partition("=")
            TRACE_SETS[label] = members.split(",")
    names = []
    for label, members in TRACE_SETS.items():
        for name in members[:max(ns)]:
            if name not in names:
                names.append(name)
    WORK.mkdir(parents=True, exist_ok=True)
    files = trace_files(names)
    images = [ROOT / "work/images" / f"{n}.raw" for n in names]
    disk = build_disk(images)
    log("computing the traces' content bounds")
    bounds = trace_bounds(ns)
    guest.ensure_packages()
    vmlinuz, moddir = guest.fetch_kernel()
    udev = guest.fetch_udev()
    binaries = guest.build_binaries(*GUEST_PROGRAM)
    binaries += [Path(shutil.which(tool)) for tool in QEMU_TOOLS]
    sets = " ".join(f"--set {label}={','.join(m[:max(ns)])}"
                    for label, m in TRACE_SETS.items())
    # qcow2 overlays opened with cache=none need a file system with O_DIRECT (not tmpfs).
    setup = ("truncate -s 1G /tmp/overlays.img && OVL=$(losetup -f) && "
             "losetup $OVL /tmp/overlays.img && mke2fs -q $OVL && mkdir -p /overlays && "
             "mount -t ext4 $OVL /overlays || echo 'BENCH-FAILED: no /overlays'\n")
    if args.readahead_kb is not None:
        setup += f"echo {args.readahead_kb} > /sys/block/vda/queue/read_ahead_kb\n"
    # Whether the idle I/O class of the warms means anything: mq-deadline and BFQ honour it.
    setup += ("echo \"BENCH: scheduler $(cat /sys/block/vda/queue/scheduler), read_ahead_kb "
              "$(cat /sys/block/vda/queue/read_ahead_kb)\"\n")
    init = INIT.format(names=",".join(names), ns=",".join(map(str, ns)), rounds=args.rounds,
                       setup=setup,
                       extra=f"--workload trace {sets} --paths {args.paths}")
    initramfs = guest.build_initramfs(WORK, moddir, udev, MODULES, binaries, init, files)
    output, seconds = guest.boot(vmlinuz, initramfs, args.timeout, args.memory,
                                 ["-drive", guest_drive(disk, args)])
    (WORK / "guest-trace.log").write_text(output)
    for line in re.findall(r"^BENCH: (scheduler .*?)\r?$", output, re.MULTILINE):
        log(f"guest disk: {line}")
    log(f"guest ran {seconds:.0f} s (log: {WORK / 'guest-trace.log'})")
    if "BENCH-DONE" not in output:
        for line in output.splitlines()[-30:]:
            print(line)
        sys.exit("bench-instantiate: the guest did not finish")
    records = [json.loads(m) for m in re.findall(r"^BENCH: (\{.*\})\r?$", output, re.MULTILINE)]
    data = {"workload": "trace", "rounds": args.rounds, "disk_mbps": args.disk_mbps,
            "readahead_kb": args.readahead_kb,
            "disk_iops": args.disk_iops, "memory_mib": args.memory, "sets": TRACE_SETS,
            "bounds": bounds, "captures": [r for r in records if "capture" in r],
            "recordings": [r for r in records if "record" in r],
            "runs": [r for r in records if "mode" in r]}
    data["summary"] = trace_report(data)
    out = args.json or WORK / "trace-results.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=1))
    log(f"results written to {out}")
    if args.plot:
        trace_plot(out, args.plot)


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", choices=["files", "trace"], default="files",
                        help="read the images' file lists, or replay traced boots")
    parser.add_argument("--paths", default=",".join(TRACE_PATHS),
                        help="trace workload: paths to read the images through, of "
                        + ", ".join(ALL_PATHS))
    parser.add_argument("--json", type=Path, help="trace workload: write the results here")
    parser.add_argument("--readahead-kb", type=int,
                        help="trace workload: the guest disk's read_ahead_kb, which the image "
                        "files' page cache reads ahead by (default: the kernel's, 128)")
    parser.add_argument("--set", action="append", metavar="LABEL=NAME,...",
                        help="trace workload: a set of images to start together, instead of "
                        + " and ".join(f"{k}={','.join(v)}" for k, v in TRACE_SETS.items()))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--ns", default="1,2,4")
    parser.add_argument("--memory", type=int, default=3072, help="guest memory in MiB")
    parser.add_argument("--timeout", type=int, default=3600)
    parser.add_argument("--disk-mbps", type=int, default=0,
                        help="throttle the guest disk to this many MB/s (0: no limit)")
    parser.add_argument("--disk-iops", type=int, default=0,
                        help="throttle the guest disk to this many read requests/s (0: no limit)")
    parser.add_argument("--results", type=Path, default=WORK / "results.json",
                        help="where to write every run as JSON")
    parser.add_argument("--plot", type=Path, help="write a plot (SVG or PNG) here")
    parser.add_argument("--replot", type=Path, nargs="+", metavar="RESULTS",
                        help="only print the table and plot of earlier results files (trace "
                        "workload: several runs of the same images are taken together, their "
                        "rounds pooled)")
    parser.add_argument("--floors", action="store_true",
                        help="trace workload: only print, from the cached traces and images, "
                        "what each set's N images read and what no sharing can remove")
    parser.add_argument("--plot-only", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.plot_only:
        if json.loads(args.plot_only.read_text()).get("workload") == "trace":
            trace_plot(args.plot_only, args.plot)
        else:
            plot(args.plot_only, args.plot)
        return
    if args.floors:
        if args.set:
            TRACE_SETS.clear()
            for spec in args.set:
                label, _, members = spec.partition("=")
                TRACE_SETS[label] = members.split(",")
        trace_floors([int(n) for n in args.ns.split(",")])
        return
    if args.replot:
        first = json.loads(args.replot[0].read_text())
        if first.get("workload") == "trace":
            data = pooled(args.replot)
            trace_report(data)
            if args.plot:
                merged = WORK / "trace-pooled.json"
                merged.parent.mkdir(parents=True, exist_ok=True)
                merged.write_text(json.dumps(data, indent=1))
                trace_plot(merged, args.plot)
        else:
            report(args.replot[0], args.plot)
        return
    ns = [int(n) for n in args.ns.split(",")]
    if args.workload == "trace":
        unknown = set(args.paths.split(",")) - set(ALL_PATHS)
        if unknown:
            sys.exit(f"bench-instantiate: unknown paths {sorted(unknown)} (of {ALL_PATHS})")
        run_trace(args, ns)
        return
    names = IMAGES[:max(ns)]

    if os.geteuid() != 0:
        sys.exit("bench-instantiate: needs root (debootstrap, chroot ldd)")
    guest.run([str(ROOT / "tools/make-images.py"), "--only", *names], stdout=subprocess.DEVNULL)
    images = [ROOT / "work/images" / f"{n}.raw" for n in names]
    WORK.mkdir(parents=True, exist_ok=True)
    lists = build_lists(names)
    disk = build_disk(images)

    guest.ensure_packages()
    vmlinuz, moddir = guest.fetch_kernel()
    udev = guest.fetch_udev()
    binaries = guest.build_binaries(*GUEST_PROGRAM)
    init = INIT.format(names=",".join(names), ns=args.ns, rounds=args.rounds, extra="",
                       setup="")
    files = {f"/bench/lists/{n}.list": lists / f"{n}.list" for n in names}
    initramfs = guest.build_initramfs(WORK, moddir, udev, MODULES, binaries, init, files)
    output, seconds = guest.boot(vmlinuz, initramfs, args.timeout, args.memory,
                                 ["-drive", guest_drive(disk, args)])
    (WORK / "guest.log").write_text(output)
    log(f"guest ran {seconds:.0f} s (log: {WORK / 'guest.log'})")
    records = [json.loads(m) for m in re.findall(r"^BENCH: (\{.*\})\r?$", output, re.MULTILINE)]
    if "BENCH-DONE" not in output:
        for line in output.splitlines()[-30:]:
            print(line)
        sys.exit("bench-instantiate: the guest did not finish")
    for r in records:
        if "capture" in r:
            s = r["summary"]
            print(f"captured {r['capture']} in {r['seconds']:.1f} s (guest): "
                  f"{s['redirected_blocks']} of {s['blocks'] - s['zero_blocks']} data blocks "
                  f"redirected")
    for line in re.findall(r"^STATS: (.*?)\r?$", output, re.MULTILINE):
        print(line)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps({
        "rounds": args.rounds, "disk_mbps": args.disk_mbps, "disk_iops": args.disk_iops,
        "memory_mib": args.memory, "dedup_bound": dedup_bound(names, lists),
        "runs": [r for r in records if "mode" in r]}, indent=1))
    report(args.results, args.plot)


if __name__ == "__main__":
    main()
