#!/usr/bin/env python3
"""A simulated fleet: H hosts (release vmards on simulated kernels, each its own state dir and
socket) capturing the same I images from one shared directory, with and without digest
sidecars.

Share part: I images of --image-size (random blocks, a quarter of each image shared with the
first one, so maps redirect), listed in a fleet manifest. Without sidecars every host runs
`vmarctl capture --manifest`; with sidecars host 1 writes them (`sidecars = "write"`) and the
other hosts import them (`sidecars = "read"`, the default sample). Reports the bytes each run
read from files (the sum over hosts of vmard's rchar, /proc/PID/io: every read(2)/pread(2),
page cache or not; on a real fleet each host has its own page cache, so a host's reads of the
share are at most this) against the images' data, the image bytes the captures themselves
report reading (`scan.bytes_read`), and whether `vmarctl fleet-status` found every host's
content and map fingerprints equal.

Time part: one --big image (default 2 GiB, random data), captured by a fresh host that hashes
it and writes its sidecar, then imported by a fresh host; --runs times each, median and range
of vmard's own `seconds`. Both with the image in the page cache (hot) and dropped from it
before each capture (cold: posix_fadvise DONTNEED on the image file only), so the cold
capture reads the disk.

    tools/bench-fleet.py [--hosts 8] [--images 4] [--image-size 256M] [--big 2G] [--runs 3]
                      [--work DIR] [--json FILE] [--skip-share] [--skip-time]

Runs itself in a private mount namespace (unshare; --map-root-user when not root) where the
share directories are bind mounts of their own, as an NFS export is to each host's state
dir: see own_mounts. Each time run's vmard log is kept in WORK/logs; with
VMAR_LOG=vmar=debug its phases are printed too.

Goals it reports against (figures, not assertions): share bytes with sidecars ~1x the
images' data whatever H (against H x without); import time <= 0.1x capture time.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RELEASE = ROOT / "target" / "release"
BLOCK = 4096


def size_arg(text):
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    if text[-1].upper() in units:
        return int(float(text[:-1]) * units[text[-1].upper()])
    return int(text)


def build():
    subprocess.run(["cargo", "build", "--release", "--quiet", "--bins", "-p", "vmar"],
                   cwd=ROOT, check=True)


def write_images(folder, count, size):
    """`count` images of `size` bytes: random blocks, every fourth 1 MiB piece of each a copy
    of the first image's (so later images redirect into it)."""
    folder.mkdir(parents=True, exist_ok=True)
    piece = 1 << 20
    first = folder / "img0.raw"
    paths = []
    for i in range(count):
        path = folder / f"img{i}.raw"
        paths.append(path)
        if path.exists() and path.stat().st_size == size:
            continue
        with open(path, "wb") as out, (open(first, "rb") if i else open(os.devnull, "rb")) as base:
            for offset in range(0, size, piece):
                n = min(piece, size - offset)
                if i and (offset // piece) % 4 == 0:
                    base.seek(offset)
                    out.write(base.read(n))
                else:
                    out.write(os.urandom(n))
    return paths


def own_mounts(work):
    """Runs the rest of the bench in a private mount namespace where the share directories
    are mounts of their own, as an NFS export is to each host's state directory. Without
    that, each vmard's hold on a captured image (a hard link in its state dir, see
    src/holds.rs) lands on the share's file system: the link, and its removal when a host's
    state goes, move the image's inode change time, which is part of every other host's
    identity of it, so no sidecar would ever be fresh. A link across mounts fails (EXDEV), and
    with sidecars on no hold is made beside the image either."""
    if os.environ.get("BENCH_FLEET_NAMESPACE") == "1":
        for name in ("share", "big"):
            folder = work / name
            folder.mkdir(parents=True, exist_ok=True)
            subprocess.run(["mount", "--bind", str(folder), str(folder)], check=True)
        return
    unshare = ["unshare", "--mount", "--propagation", "private"]
    if os.geteuid() != 0:
        unshare.append("--map-root-user")
    env = dict(os.environ, BENCH_FLEET_NAMESPACE="1")
    argv = [sys.executable, str(Path(__file__).resolve())] + sys.argv[1:] + ["--no-build"]
    sys.exit(subprocess.run(unshare + ["--"] + argv, env=env, check=False).returncode)


def drop_from_cache(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def warm(path):
    with open(path, "rb") as f:
        while f.read(8 << 20):
            pass


def rchar(pid):
    with open(f"/proc/{pid}/io") as io:
        for line in io:
            if line.startswith("rchar:"):
                return int(line.split()[1])
    return 0


class Host:
    """A release vmard on a simulated kernel with its own state; the share is its image root."""

    def __init__(self, base, share, config):
        self.base = Path(base)
        self.base.mkdir(parents=True, exist_ok=True)
        (self.base / "vmar.toml").write_text(config)
        self.socket = self.base / "vmard.sock"
        self.ctl = [str(RELEASE / "vmarctl"), "--socket", str(self.socket), "--json"]
        env = dict(os.environ, VMAR_LOG=os.environ.get("VMAR_LOG", "warn"))
        # vmard gets its own copy of the log's descriptor: ours closes at once.
        with open(self.base / "vmard.log", "ab") as log:
            self.proc = subprocess.Popen(
                [str(RELEASE / "vmard"), "--config", str(self.base / "vmar.toml"),
                 "--state-dir", str(self.base / "state"), "--image-root", str(share),
                 "--sim", str(self.base / "sim"), "--socket", str(self.socket)],
                env=env, stdout=log, stderr=log)
        deadline = time.time() + 60
        while subprocess.run(self.ctl + ["ping"], capture_output=True,
                             check=False).returncode != 0:
            if self.proc.poll() is not None or time.time() > deadline:
                sys.exit(f"vmard did not start; see {self.base / 'vmard.log'}")
            time.sleep(0.05)

    def call(self, *args, check=True):
        out = subprocess.run(self.ctl + list(args), capture_output=True, text=True, check=False)
        if check and out.returncode != 0:
            sys.exit(f"vmarctl {' '.join(args)} failed: {out.stderr}{out.stdout}")
        return json.loads(out.stdout) if out.stdout.strip() else {}

    def stop(self):
        self.proc.terminate()
        self.proc.wait()


def share_run(work, paths, hosts, sidecars):
    """All hosts capture the manifest; returns the figures of the run."""
    share = paths[0].parent
    for leftover in share.glob(".*.vmar-digests"):
        leftover.unlink()
    manifest = share / "fleet.manifest"
    manifest.write_text("".join(f"{p.name}\n" for p in paths))
    shutil.rmtree(share / "fleet.manifest.hosts", ignore_errors=True)
    base = work / ("hosts-sidecars" if sidecars else "hosts-plain")
    shutil.rmtree(base, ignore_errors=True)
    rchars, image_bytes, imported = [], 0, 0
    started = time.perf_counter()
    for h in range(hosts):
        config = ""
        if sidecars:
            config = 'sidecars = "write"\n' if h == 0 else 'sidecars = "read"\n'
        host = Host(base / f"h{h}", share, config)
        before = rchar(host.proc.pid)
        doc = host.call("capture", "--manifest", str(manifest), "--host", f"h{h}")
        rchars.append(rchar(host.proc.pid) - before)
        for entry in doc["images"]:
            result = entry["result"]
            image_bytes += result["image"]["scan"]["bytes_read"]
            imported += bool(result.get("sidecar", {}).get("imported"))
        host.stop()
    seconds = time.perf_counter() - started
    # Exits 3 when hosts differ: that is in the JSON.
    status = subprocess.run([str(RELEASE / "vmarctl"), "--json", "fleet-status", str(manifest)],
                            capture_output=True, text=True, check=False)
    differ = json.loads(status.stdout)["differ"]
    return {"sidecars": sidecars, "hosts": hosts, "images": len(paths),
            "read_bytes": sum(rchars), "image_bytes_read": image_bytes,
            "imported": imported, "differ": differ, "seconds": seconds}


def time_runs(work, big, runs, cold):
    """Capture (hash + write sidecar) and import of `big`, `runs` times each, fresh hosts."""
    share = big.parent
    captures, imports = [], []
    for r in range(runs):
        for leftover in share.glob(f".{big.name}.vmar-digests"):
            leftover.unlink()
        for mode, times in (("write", captures), ("read", imports)):
            base = work / f"time-{mode}-{r}"
            shutil.rmtree(base, ignore_errors=True)
            host = Host(base, share, f'sidecars = "{mode}"\n')
            if cold:
                drop_from_cache(big)
            else:
                warm(big)
            doc = host.call("capture", str(big))
            host.stop()
            result = doc["images"][0]["result"]
            want = mode == "read"
            if bool(result.get("sidecar", {}).get("imported")) != want:
                sys.exit(f"expected imported={want}: {result}")
            times.append(result["seconds"])
            # Kept for the phases (VMAR_LOG=vmar=debug logs them in its "captured" line).
            logs = work / "logs"
            logs.mkdir(exist_ok=True)
            kept = logs / f"{'cold' if cold else 'hot'}-{'capture' if mode == 'write' else 'import'}-{r}.log"
            shutil.copyfile(base / "vmard.log", kept)
            phases = [line.strip() for line in kept.read_text(errors="replace").splitlines()
                      if "hashed=" in line]
            for line in phases:
                print(f"  {mode} run {r}: {line}", flush=True)
            shutil.rmtree(base, ignore_errors=True)
    return captures, imports


def fmt_range(values):
    return f"{statistics.median(values):.2f} s ({min(values):.2f}-{max(values):.2f})"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hosts", type=int, default=8)
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--image-size", default="256M")
    parser.add_argument("--big", default="2G")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--work", type=Path, default=ROOT / "work" / "bench-fleet")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--skip-share", action="store_true")
    parser.add_argument("--skip-time", action="store_true")
    parser.add_argument("--no-build", action="store_true")
    args = parser.parse_args()
    if not args.no_build:
        build()
    args.work.mkdir(parents=True, exist_ok=True)
    own_mounts(args.work)
    report = {}
    if not args.skip_share:
        paths = write_images(args.work / "share", args.images, size_arg(args.image_size))
        data = sum(p.stat().st_size for p in paths)
        print(f"share: {args.images} images, {data / 2**20:.0f} MiB of data, "
              f"{args.hosts} hosts")
        print(f"{'sidecars':<9} {'hosts':>5} {'bytes read (all hosts)':>24} {'x data':>7} "
              f"{'image bytes read':>17} {'imported':>8} {'hosts differ':>12} {'wall':>8}")
        rows = []
        for sidecars in (False, True):
            row = share_run(args.work, paths, args.hosts, sidecars)
            row["data_bytes"] = data
            rows.append(row)
            print(f"{'yes' if sidecars else 'no':<9} {row['hosts']:>5} "
                  f"{row['read_bytes'] / 2**20:>20.1f} MiB {row['read_bytes'] / data:>6.2f}x "
                  f"{row['image_bytes_read'] / 2**20:>13.1f} MiB {row['imported']:>8} "
                  f"{row['differ']:>12} {row['seconds']:>7.1f}s", flush=True)
        report["share"] = rows
    if not args.skip_time:
        big = write_images(args.work / "big", 1, size_arg(args.big))[0]
        rows = []
        for cold in (False, True):
            captures, imports = time_runs(args.work, big, args.runs, cold)
            ratio = statistics.median(imports) / statistics.median(captures)
            rows.append({"cache": "cold" if cold else "hot", "capture_seconds": captures,
                         "import_seconds": imports, "ratio": ratio})
            print(f"{args.big} image, page cache {'cold' if cold else 'hot'}: capture "
                  f"{fmt_range(captures)}, import {fmt_range(imports)}, "
                  f"import/capture {ratio:.3f} (goal <= 0.1)", flush=True)
        report["time"] = rows
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
