"""Helpers shared by the scripts in tools/ (benchmarks, image builders): paths, running and
building, and what /proc says about a process. The QEMU guests have their own module,
guest.py. Imported as `import toollib` (a script's own folder is on Python's path)."""

import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RELEASE = ROOT / "target" / "release"


def run(cmd, **kw):
    """Runs `cmd`, failing on a non-zero exit."""
    return subprocess.run(cmd, check=True, **kw)


def build_release():
    """vmard, vmarctl and the devtools binaries, release build."""
    run(["cargo", "build", "--release", "--quiet", "--bins", "-p", "vmar", "-p", "vmar-devtools"],
        cwd=ROOT)


def cpu_seconds(pid):
    """User + system CPU time of a process so far (all its threads): less sensitive to
    other jobs on the machine than wall time."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_rss_kib(pid):
    """The process's peak resident set (VmHWM), KiB."""
    return _proc_field(f"/proc/{pid}/status", "VmHWM:")


def rchar(pid):
    """Bytes the process read with read(2) and pread(2) so far, page cache or not."""
    return _proc_field(f"/proc/{pid}/io", "rchar:")


def _proc_field(path, key):
    with open(path) as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1])
    return 0


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def boot_files(tree, tool):
    """The kernel and initramfs in an image tree's /boot (what a boot loader would load)."""
    kernels = sorted((tree / "boot").glob("vmlinuz-*"))
    if not kernels:
        sys.exit(f"{tool}: no kernel in {tree / 'boot'} (rebuild with tools/make-images.py)")
    release = kernels[-1].name[len("vmlinuz-"):]
    return kernels[-1], tree / "boot" / f"initrd.img-{release}"
