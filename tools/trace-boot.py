#!/usr/bin/env python3
"""Boots each image of tools/make-images.py in QEMU and records every read the guest makes of
its disk, in order, split at the images' two serial-console markers into an OS phase (until
`VMAR-OS-READY`) and an application phase (until `VMAR-APP-READY`).

The image is attached as a virtio disk with `snapshot=on`, so the guest's writes go to a
temporary overlay and the image never changes. QEMU boots the kernel and initramfs of the
image's own /boot (taken from its root tree, as a boot loader would load them), with
`root=/dev/vda1`; TCG (nested KVM hangs on this host). QEMU's block-layer trace events
record the reads: `blk_co_preadv` (offset, bytes: what the guest reads of its disk, after
virtio-blk merged adjacent requests), `blk_co_pwritev` (reads of blocks the guest wrote
before are served by the overlay, not the image, and are left out), and
`virtio_blk_handle_read`/`virtio_blk_rw_complete` (the requests in flight when a read was
issued: the queue depth the guest used). QEMU stamps events with the wall clock
(`-msg timestamp=on`); the markers are stamped when their line reaches this process.

    tools/trace-boot.py [--only NAME... | --family | --all] [--memory 1024] [--timeout 1800]
                     [--force]

Builds missing images with tools/make-images. Caches each trace as work/traces/NAME.json
and QEMU's events as NAME.events
(rebuilt when the image is newer, or with --force) with, per phase, the reads as
[seconds since QEMU started, offset, bytes] and the queue depth. Prints per image and phase:
bytes, requests, distinct 4 KiB blocks, the queue depth, and how much of the phase's
distinct blocks (by content) the other images' traces also read.
"""

import argparse
import hashlib
import json
import os
import re
import select
import subprocess
import sys
import time
from pathlib import Path

from toollib import boot_files

ROOT = Path(__file__).resolve().parent.parent
IMAGES = ROOT / "work" / "images"
WORK = ROOT / "work" / "traces"
BLOCK = 4096
PHASES = ["os", "app"]
MARKERS = {"os": "VMAR-OS-READY", "app": "VMAR-APP-READY"}
DEFAULT = ["base", "web", "db", "dev"]
FAMILY = ["web", "web-rebuild", "web-tools", "web-ops"]
ALL = ["base", "web", "db", "dev", "cache", "php", "node", "mail"]
EVENTS = ["blk_co_preadv", "blk_co_pwritev", "virtio_blk_handle_read",
          "virtio_blk_rw_complete"]
LINE = re.compile(r"^\d+@(\d+)\.(\d+):(\w+) (.*)$")


def log(message):
    print(f"trace-boot: {message}", file=sys.stderr, flush=True)


def boot(name, memory, timeout):
    """Boots the image; returns the raw trace path, QEMU's start time (wall clock) and the
    marker times (wall clock), or exits with the console's tail."""
    image = IMAGES / f"{name}.raw"
    vmlinuz, initrd = boot_files(IMAGES / "trees" / name, "trace-boot")
    raw = WORK / f"{name}.events"
    raw.unlink(missing_ok=True)
    cmd = ["qemu-system-x86_64", "-accel", "tcg", "-cpu", "max", "-m", str(memory),
           "-smp", "2", "-nographic", "-no-reboot", "-kernel", str(vmlinuz), "-initrd",
           str(initrd), "-append",
           "root=/dev/vda1 ro console=ttyS0 quiet loglevel=3 panic=-1 systemd.show_status=0",
           "-drive", f"file={image},if=virtio,format=raw,snapshot=on,cache=none",
           "-nic", "none", "-msg", "timestamp=on", "-D", str(raw),
           *[arg for event in EVENTS for arg in ["-trace", event]]]
    log(f"booting {name}: {' '.join(cmd)}")
    started = time.time()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    marks, console, buffer = {}, [], b""
    try:
        while "app" not in marks:
            if time.time() - started > timeout:
                break
            ready, _, _ = select.select([proc.stdout], [], [], 1.0)
            if not ready:
                if proc.poll() is not None:
                    break
                continue
            chunk = os.read(proc.stdout.fileno(), 65536)
            now = time.time()
            if not chunk:
                break
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                text = line.decode(errors="replace").rstrip("\r")
                console.append(text)
                for phase, marker in MARKERS.items():
                    if marker in text and phase not in marks:
                        marks[phase] = now
                        log(f"{name}: {marker} at {now - started:.1f} s")
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    (WORK / f"{name}.console").write_text("\n".join(console) + "\n")
    if "app" not in marks or "os" not in marks:
        for line in console[-40:]:
            print(line, file=sys.stderr)
        sys.exit(f"trace-boot: {name} did not reach both markers within {timeout} s "
                 f"(console: {WORK / f'{name}.console'})")
    return raw, started, marks


def parse(raw, started, marks):
    """Per phase: the reads [seconds, offset, bytes] not served by the guest's own writes,
    and the mean number of guest requests in flight when one was issued."""
    written = set()
    inflight = set()
    # The guest's disk is the BlockBackend of the first read; QEMU's own writes creating the
    # snapshot overlay go through another one.
    guest_blk = None
    reads = {phase: [] for phase in PHASES}
    depths = {phase: [] for phase in PHASES}
    ends = [marks["os"], marks["app"]]
    with open(raw, errors="replace") as f:
        for line in f:
            m = LINE.match(line.strip())
            if not m:
                continue
            when = int(m.group(1)) + int(m.group(2)) / 1e6
            event, fields = m.group(3), m.group(4).split()
            values = dict(zip(fields[::2], fields[1::2]))
            if when >= ends[1]:
                break
            if event.startswith("blk_co_"):
                if guest_blk is None and event == "blk_co_preadv":
                    guest_blk = values["blk"]
                if values["blk"] != guest_blk:
                    continue
            phase = "os" if when < ends[0] else "app"
            if event == "virtio_blk_handle_read":
                inflight.add(values["req"])
                depths[phase].append(len(inflight))
            elif event == "virtio_blk_rw_complete":
                inflight.discard(values["req"])
            elif event == "blk_co_pwritev":
                offset, size = int(values["offset"]), int(values["bytes"])
                written.update(range(offset // BLOCK, (offset + size - 1) // BLOCK + 1))
            elif event == "blk_co_preadv":
                offset, size = int(values["offset"]), int(values["bytes"])
                blocks = range(offset // BLOCK, (offset + size - 1) // BLOCK + 1)
                if all(b in written for b in blocks):
                    continue
                reads[phase].append([round(when - started, 6), offset, size])
    return {phase: {"reads": reads[phase],
                    "queue_depth": max(1, round(sum(depths[phase]) / len(depths[phase])))
                    if depths[phase] else 1,
                    "max_queue_depth": max(depths[phase], default=1)}
            for phase in PHASES}


def trace(name, memory, timeout, force):
    WORK.mkdir(parents=True, exist_ok=True)
    path = WORK / f"{name}.json"
    image = IMAGES / f"{name}.raw"
    if path.exists() and not force and path.stat().st_mtime >= image.stat().st_mtime:
        return json.loads(path.read_text())
    raw, started, marks = boot(name, memory, timeout)
    result = {"image": name, "image_bytes": image.stat().st_size, "started": started,
              "os_ready_s": round(marks["os"] - started, 3),
              "app_ready_s": round(marks["app"] - started, 3),
              "phases": parse(raw, started, marks)}
    path.write_text(json.dumps(result))
    return result


def reparse(name):
    """Parses the kept QEMU events of an earlier boot again (after a change of the parser)."""
    path = WORK / f"{name}.json"
    result = json.loads(path.read_text())
    started = result["started"]
    marks = {"os": started + result["os_ready_s"], "app": started + result["app_ready_s"]}
    result["phases"] = parse(WORK / f"{name}.events", started, marks)
    path.write_text(json.dumps(result))
    return result


def blocks_of(reads):
    """Distinct 4 KiB blocks (by disk address) the reads touch, in first-read order."""
    seen = {}
    for _, offset, size in reads:
        for block in range(offset // BLOCK, (offset + size - 1) // BLOCK + 1):
            seen.setdefault(block, None)
    return list(seen)


def contents(name, blocks):
    """Content digests of the image's blocks; None for all-zero blocks."""
    zero = bytes(BLOCK)
    out = []
    with open(IMAGES / f"{name}.raw", "rb") as f:
        for block in blocks:
            f.seek(block * BLOCK)
            data = f.read(BLOCK).ljust(BLOCK, b"\0")
            out.append(None if data == zero else hashlib.blake2b(data, digest_size=16).digest())
    return out


def summary(traces):
    digests = {}
    for name, t in traces.items():
        for phase in PHASES:
            digests[(name, phase)] = {
                d for d in contents(name, blocks_of(t["phases"][phase]["reads"])) if d}
    mib = 2 ** 20
    print(f"{'image':<12} {'phase':<5} {'boot s':>7} {'MiB':>7} {'requests':>8} "
          f"{'4K blocks':>9} {'QD':>4} {'also read by others':>20}")
    for name, t in traces.items():
        for phase in PHASES:
            p = t["phases"][phase]
            reads = p["reads"]
            mine = digests[(name, phase)]
            others = set().union(*[d for (n, _), d in digests.items() if n != name])
            shared = len(mine & others) / len(mine) if mine else 0
            when = t["os_ready_s"] if phase == "os" else t["app_ready_s"]
            print(f"{name:<12} {phase:<5} {when:>7.1f} "
                  f"{sum(r[2] for r in reads) / mib:>7.1f} {len(reads):>8} "
                  f"{len(blocks_of(reads)):>9} {p['queue_depth']:>4} {shared:>19.0%}")


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*")
    parser.add_argument("--family", action="store_true", help=f"trace {', '.join(FAMILY)}")
    parser.add_argument("--all", action="store_true", help=f"trace {', '.join(ALL)}")
    parser.add_argument("--memory", type=int, default=1024, help="guest memory (MiB)")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per boot")
    parser.add_argument("--force", action="store_true", help="trace again even if cached")
    parser.add_argument("--reparse", action="store_true",
                        help="only parse the kept QEMU events (work/traces/NAME.events) again")
    args = parser.parse_args()
    names = args.only or (FAMILY if args.family else ALL if args.all else DEFAULT)
    if args.reparse:
        traces = {name: reparse(name) for name in names}
    else:
        subprocess.run([str(ROOT / "tools/make-images.py"), "--only", *names], check=True,
                       stdout=subprocess.DEVNULL)
        traces = {name: trace(name, args.memory, args.timeout, args.force) for name in names}
    summary(traces)


if __name__ == "__main__":
    main()
