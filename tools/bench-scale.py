#!/usr/bin/env python3
"""How the catalog scales: a family of N small images captured one after another, and one
huge sparse image.

Family part (N = --images, default 1,000): generates (once, cached under work/scale) a family
of N images of --image-size each with `make-test-images family --shuffle` (a base image and
derived ones that keep most of its files, in an order of their own, and add unique ones),
then captures them in order through one fresh release vmard (`--sim`: no root or
device-mapper needed, only the catalog is measured). Reports:
  - per-image capture time: vmard's own figure (`seconds` of the reply) and the client's wall
    time, median of the first 10 against the last 10 (ratio), and the median per tenth;
  - state size per image (du of the state directory / N) and vmard's peak RSS (VmHWM);
  - restart to ping: SIGTERM, wait for the clean stop, start vmard again, time until
    `vmarctl ping` succeeds; median of --restarts. References measured in the same run: the
    same restart with an empty catalog, `vmarctl ping` of a running vmard, and with
    --reference another vmard binary (e.g. one built from main) restarted alternately with
    the measured one on the same state; each also with the state dropped from the page cache
    first (as after a reboot);
  - `vmarctl forget` of early images (the 2nd, then the next ones) at N images, wall time.
Sparse part: one --sparse-size image (default 1 TiB) with --sparse-data of data (default
8 GiB), its data read once so the page cache is hot, captured by a fresh vmard: capture time,
vmard's peak RSS, map extents.

Goals it reports against (figures, not assertions): last 10 within 1.5x of the first 10,
forget under 0.2 s, restart to ping under 50 ms, capture peak RSS under 128 MiB.

    tools/bench-scale.py [--images 1000] [--image-size 16M] [--restarts 11] [--forgets 3]
                      [--sparse-size 1T] [--sparse-data 8G] [--sparse-runs 1]
                      [--skip-family] [--skip-sparse] [--work DIR] [--json FILE]
                      [--vmard PATH] [--reference PATH]

A quick run: tools/bench-scale.py --images 100 --sparse-size 64G --sparse-data 1G
"""

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from toollib import RELEASE, ROOT, cpu_seconds, median, peak_rss_kib, run
from toollib import build_release as build

VMARD = RELEASE / "vmard"
GOALS = {"capture_ratio": 1.5, "forget_seconds": 0.2, "restart_seconds": 0.050,
         "peak_rss_mib": 128}


def generated(work, name, make):
    """Runs `make(tmp)` once to produce `work/name` (kept for the next runs)."""
    path = work / name
    if not path.exists():
        print(f"generating {name} ...", file=sys.stderr)
        tmp = work / f"{name}.tmp"
        started = time.perf_counter()
        make(tmp)
        tmp.rename(path)
        print(f"  {time.perf_counter() - started:.1f} s", file=sys.stderr)
    return path


def family(work, count, size):
    """The family's image paths, in the order they are to be captured."""
    def make(tmp):
        out = run([str(RELEASE / "make-test-images"), "family", str(tmp), "--count",
                   str(count), "--size", size, "--shuffle"],
                  capture_output=True, text=True).stdout
        names = [Path(line).name for line in out.split()]
        (tmp / "order.txt").write_text("\n".join(names) + "\n")
    folder = generated(work, f"family-{count}x{size}", make)
    return [folder / name for name in (folder / "order.txt").read_text().split()]


def sparse(work, size, data):
    return generated(work, f"sparse-{size}-{data}.raw", lambda tmp: run(
        [str(RELEASE / "make-test-images"), "sparse", str(tmp), "--size", size,
         "--data-size", data], stdout=subprocess.DEVNULL))


def warm_data(path):
    """Reads the data of a sparse file, skipping its holes (SEEK_DATA/SEEK_HOLE), so the
    capture starts from a hot page cache without reading a terabyte of holes."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size, offset = os.fstat(fd).st_size, 0
        while offset < size:
            try:
                offset = os.lseek(fd, offset, os.SEEK_DATA)
            except OSError:
                break
            end = os.lseek(fd, offset, os.SEEK_HOLE)
            while offset < end:
                chunk = os.pread(fd, min(end - offset, 8 << 20), offset)
                if not chunk:
                    break
                offset += len(chunk)
    finally:
        os.close(fd)


def disk_usage(path):
    """Bytes `path` takes on disk (what `du -s` counts)."""
    total = 0
    for folder, _, files in os.walk(path):
        for name in files + [""]:
            try:
                total += os.lstat(os.path.join(folder, name)).st_blocks * 512
            except FileNotFoundError:
                pass
    return total


class Daemon:
    """A release vmard on a simulated kernel, with its state under `base`."""

    def __init__(self, base, image_root):
        self.base = Path(base)
        self.image_root = image_root
        self.socket = self.base / "vmard.sock"
        self.ctl = [str(RELEASE / "vmarctl"), "--socket", str(self.socket), "--json"]
        self.proc = None
        self.log = self.base / "vmard.log"

    def start(self, vmard=None):
        """Starts vmard (`vmard`: another binary); returns seconds until `vmarctl ping`
        succeeded."""
        env = dict(os.environ)
        env.setdefault("VMAR_LOG", "warn")  # VMAR_LOG=vmar=debug logs capture phases
        started = time.perf_counter()
        # vmard gets its own copy of the log's descriptor: ours closes at once.
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [str(vmard or VMARD), "--state-dir", str(self.base / "state"),
                 "--image-root", str(self.image_root), "--sim", str(self.base / "sim"),
                 "--socket", str(self.socket)], env=env, stderr=log)
        deadline = started + 120
        while time.perf_counter() < deadline:
            if self.proc.poll() is not None:
                sys.exit(f"vmard exited with {self.proc.returncode}; see {self.log}")
            # Cheap until the socket exists; then vmarctl ping, which waits in the socket's
            # backlog until vmard answers.
            if self.connectable() and self.ping():
                elapsed = time.perf_counter() - started
                self.start_cpu = cpu_seconds(self.proc.pid)
                return elapsed
            time.sleep(0.0005)
        sys.exit(f"vmard did not answer within 120 s; see {self.log}")

    def connectable(self):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            try:
                s.connect(str(self.socket))
                return True
            except OSError:
                return False

    def ping(self):
        return subprocess.run(self.ctl + ["ping"], capture_output=True,
                              check=False).returncode == 0

    def stop(self):
        """SIGTERM and wait for the clean stop; returns seconds it took."""
        started = time.perf_counter()
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait()
        if code != 0:
            sys.exit(f"vmard stopped with {code}; see {self.log}")
        return time.perf_counter() - started

    def call(self, *args):
        """Runs a vmarctl command; returns (wall seconds, JSON reply)."""
        started = time.perf_counter()
        out = run(self.ctl + list(args), capture_output=True).stdout
        return time.perf_counter() - started, json.loads(out)

    def peak_rss_mib(self):
        return peak_rss_kib(self.proc.pid) / 1024


def drop_cache(folder):
    """Drops the files under `folder` from the page cache, as after a reboot."""
    for parent, _, files in os.walk(folder):
        for name in files:
            try:
                fd = os.open(os.path.join(parent, name), os.O_RDONLY)
            except OSError:
                continue
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)


def restarts(daemon, count, cold=False, reference=None):
    """`count` clean stops and starts. `cold`: the state directory is dropped from the page
    cache before each start. `reference`: another vmard binary, started on the same state
    after each start of the measured one (same load, same files). Returns lists of seconds:
    to ping, to stop, vmard's CPU until it answered, and the same for the reference."""
    out = {"seconds": [], "stop_seconds": [], "cpu_seconds": [],
           "reference_seconds": [], "reference_cpu_seconds": []}
    for _ in range(count):
        out["stop_seconds"].append(daemon.stop())
        if cold:
            drop_cache(daemon.base / "state")
        out["seconds"].append(daemon.start())
        out["cpu_seconds"].append(daemon.start_cpu)
        if reference:
            daemon.stop()
            if cold:
                drop_cache(daemon.base / "state")
            out["reference_seconds"].append(daemon.start(reference))
            out["reference_cpu_seconds"].append(daemon.start_cpu)
    if reference:
        daemon.stop()
        daemon.start()
    return out


def restart_rows(label, r, goal=True):
    """Table rows of one set of restarts (and of its reference, if measured)."""
    secs, cpu = r["seconds"], r["cpu_seconds"]
    rows = [(label, f"{median(secs) * 1000:.1f}",
             f"< {GOALS['restart_seconds'] * 1000:.0f}" if goal else "",
             f"{spread(secs)}; first {secs[0] * 1000:.1f}; CPU {median(cpu) * 1000:.0f}")]
    ref, ref_cpu = r["reference_seconds"], r["reference_cpu_seconds"]
    if ref:
        rows.append(("    reference vmard, same state", f"{median(ref) * 1000:.1f}", "",
                     (f"{spread(ref)}; CPU {median(ref_cpu) * 1000:.0f}; measured / reference "
                     f"{median(secs) / median(ref):.2f}x")))
    return rows


def spread(xs):
    return f"{min(xs) * 1000:.1f}..{max(xs) * 1000:.1f}"


def bench_family(args):
    images = family(args.work, args.images, args.image_size)
    n = len(images)
    for path in images:
        run(["cat", str(path)], stdout=subprocess.DEVNULL)
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        daemon = Daemon(tmp, images[0].parent)
        daemon.start()
        server, wall, names = [], [], []
        started = time.perf_counter()
        for i, path in enumerate(images):
            seconds, reply = daemon.call("capture", str(path))
            result = reply["images"][0]["result"]
            if result["status"] != "captured":
                sys.exit(f"{path.name}: {result['status']}")
            wall.append(seconds)
            server.append(result["seconds"])
            names.append(result["image"]["name"])
            if (i + 1) % 100 == 0:
                print(f"  captured {i + 1}/{n}", file=sys.stderr)
        total = time.perf_counter() - started
        capture_rss = daemon.peak_rss_mib()
        state = daemon.base / "state"
        state_bytes = disk_usage(state)
        index_bytes = disk_usage(state / "index")
        catalog_bytes = os.path.getsize(state / "catalog.redb")
        pings = [daemon.call("ping")[0] for _ in range(args.restarts)]
        listing = [daemon.call("images")[0] for _ in range(args.restarts)]
        hot = restarts(daemon, args.restarts, reference=args.reference)
        cold = restarts(daemon, args.restarts, cold=True, reference=args.reference)
        forgets = []
        for name in names[1:1 + args.forgets]:
            seconds, _ = daemon.call("forget", name)
            forgets.append({"image": name, "seconds": seconds})
        forget_rss = daemon.peak_rss_mib()
        daemon.stop()
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        empty = Daemon(tmp, images[0].parent)
        empty.start()
        empty_restarts = restarts(empty, args.restarts)
        empty.stop()

    k = min(10, n)
    first, last = median(server[:k]), median(server[-k:])
    first_wall, last_wall = median(wall[:k]), median(wall[-k:])
    tenth = max(1, n // 10)
    tenths = [median(server[i:i + tenth]) for i in range(0, n, tenth)]
    result = {
        "images": n, "image_size": args.image_size, "total_capture_seconds": total,
        "capture_seconds": server, "capture_wall_seconds": wall,
        "first10_median_seconds": first, "last10_median_seconds": last,
        "last_to_first_ratio": last / first,
        "first10_median_wall_seconds": first_wall, "last10_median_wall_seconds": last_wall,
        "last_to_first_wall_ratio": last_wall / first_wall,
        "median_per_tenth_seconds": tenths,
        "state_bytes": state_bytes, "state_bytes_per_image": state_bytes / n,
        "catalog_file_bytes": catalog_bytes, "index_bytes": index_bytes,
        "capture_peak_rss_mib": capture_rss, "peak_rss_mib_after_forgets": forget_rss,
        "restarts": hot, "cold_restarts": cold, "empty_restarts": empty_restarts,
        "images_listing_seconds": listing, "ping_seconds": pings, "forgets": forgets,
    }

    print(f"\nvmard: {VMARD}")
    print(f"family of {n} images of {args.image_size} (make-test-images family --shuffle), "
          f"captured in order by one vmard --sim, {os.cpu_count()} CPUs; times in ms")
    print(f"{'measure':<44} {'value':>10}  {'goal':<10} notes")
    rows = [
        ("capture, median of first 10 (vmard)", f"{first * 1000:.2f}", "",
         f"wall {first_wall * 1000:.2f}"),
        ("capture, median of last 10 (vmard)", f"{last * 1000:.2f}", "",
         f"wall {last_wall * 1000:.2f}"),
        ("  last 10 / first 10", f"{last / first:.2f}x", f"<= {GOALS['capture_ratio']}x",
         f"wall {last_wall / first_wall:.2f}x"),
        ("capture, median per tenth (vmard)", "", "",
         " ".join(f"{t * 1000:.1f}" for t in tenths)),
        ("all captures (wall, s)", f"{total:.1f}", "", ""),
        ("state size per image (KiB)", f"{state_bytes / n / 1024:.1f}", "",
         (f"catalog file {catalog_bytes / 2**20:.1f} MiB, index {index_bytes / 2**20:.1f} MiB, "
         f"total {state_bytes / 2**20:.1f} MiB")),
        ("vmard peak RSS after the captures (MiB)", f"{capture_rss:.1f}",
         f"< {GOALS['peak_rss_mib']}",
         f"restarted vmard after the forgets {forget_rss:.1f}"),
    ] + restart_rows(f"restart to ping, median of {args.restarts}", hot)
    rows += restart_rows("  state dropped from the page cache first", cold)
    rows += restart_rows("  empty catalog (reference)", empty_restarts, goal=False)
    stops = hot["stop_seconds"]
    rows += [
        ("  vmarctl ping of a running vmard", f"{median(pings) * 1000:.1f}", "",
         f"{spread(pings)}"),
        ("  clean stop (SIGTERM to exit)", f"{median(stops) * 1000:.1f}", "", spread(stops)),
        (f"vmarctl images ({n} records), wall", f"{median(listing) * 1000:.1f}", "",
         spread(listing)),
    ]
    for f in forgets:
        rows.append((f"forget {f['image']} (wall)", f"{f['seconds'] * 1000:.1f}",
                     f"< {GOALS['forget_seconds'] * 1000:.0f}", ""))
    for label, value, goal, note in rows:
        print(f"{label:<44} {value:>10}  {goal:<10} {note}")
    return result


def bench_sparse(args):
    path = sparse(args.work, args.sparse_size, args.sparse_data)
    runs = []
    for _ in range(args.sparse_runs):
        warm_data(path)
        with tempfile.TemporaryDirectory(dir=args.work) as tmp:
            daemon = Daemon(tmp, path.parent)
            daemon.start()
            wall, reply = daemon.call("capture", str(path))
            result = reply["images"][0]["result"]
            runs.append({"wall_seconds": wall, "seconds": result["seconds"],
                         "peak_rss_mib": daemon.peak_rss_mib(),
                         "extents": result["image"]["summary"]["extents"],
                         "scan": result["image"]["scan"], "size": result["image"]["size"],
                         "index_bytes": disk_usage(daemon.base / "state" / "index")})
            if len(runs) == 1:
                hot = restarts(daemon, args.restarts, reference=args.reference)
                cold = restarts(daemon, args.restarts, cold=True, reference=args.reference)
            daemon.stop()
    secs = [r["seconds"] for r in runs]
    rss = max(r["peak_rss_mib"] for r in runs)
    scan = runs[0]["scan"]
    print(f"\nsparse {args.sparse_size} image with {args.sparse_data} of data, hot page cache, "
          f"fresh vmard --sim each run, median of {len(runs)}")
    print(f"{'measure':<44} {'value':>10}  {'goal':<10} notes")
    print(f"{'capture (vmard, s)':<44} {median(secs):>10.2f}  {'':<10} "
          f"wall {median([r['wall_seconds'] for r in runs]):.2f}; "
          f"{scan['bytes_read'] / 2**30 / median(secs):.2f} GiB/s of data")
    print(f"{'vmard peak RSS (MiB)':<44} {rss:>10.1f}  {'< ' + str(GOALS['peak_rss_mib']):<10}")
    print(f"{'map extents':<44} {runs[0]['extents']:>10}  {'':<10} "
          f"hashed blocks {scan['hashed_blocks']}, hole blocks {scan['hole_blocks']}")
    rows = restart_rows(f"restart to ping (ms), median of {args.restarts}", hot)
    rows += restart_rows("  state dropped from the page cache first", cold)
    for label, value, goal, note in rows:
        print(f"{label:<44} {value:>10}  {goal:<10} {note}")
    print(f"index {runs[0]['index_bytes'] / 2**20:.1f} MiB")
    return {"image": path.name, "runs": runs, "capture_seconds": secs, "peak_rss_mib": rss,
            "extents": runs[0]["extents"], "restarts": hot, "cold_restarts": cold}


def main():
    global VMARD
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--image-size", default="16M")
    parser.add_argument("--restarts", type=int, default=11)
    parser.add_argument("--forgets", type=int, default=3,
                        help="forget this many early images (the 2nd, 3rd, ...)")
    parser.add_argument("--sparse-size", default="1T")
    parser.add_argument("--sparse-data", default="8G")
    parser.add_argument("--sparse-runs", type=int, default=1)
    parser.add_argument("--skip-family", action="store_true")
    parser.add_argument("--skip-sparse", action="store_true")
    parser.add_argument("--work", type=Path, default=ROOT / "work" / "scale")
    parser.add_argument("--json", type=Path, help="write the figures to this file")
    parser.add_argument("--vmard", type=Path, default=VMARD,
                        help="the vmard binary to measure (e.g. a copy built from another "
                        "commit, for a before/after comparison)")
    parser.add_argument("--reference", type=Path,
                        help="another vmard binary whose restarts are measured alternately "
                        "with the measured one's, on the same state")
    args = parser.parse_args()
    VMARD = args.vmard.resolve()
    if args.reference:
        args.reference = args.reference.resolve()
    if args.images < 2 or args.restarts < 1:
        parser.error("--images must be at least 2 and --restarts at least 1")

    args.work.mkdir(parents=True, exist_ok=True)
    build()
    out = {}
    if not args.skip_family:
        out["family"] = bench_family(args)
    if not args.skip_sparse:
        out["sparse"] = bench_sparse(args)
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
        print(f"results in {args.json}")


if __name__ == "__main__":
    main()
