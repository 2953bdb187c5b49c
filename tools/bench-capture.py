#!/usr/bin/env python3
"""Capture throughput of vmard against b3sum on the same files, vmard's peak RSS, and
`verify` of a large sparse image against its capture time and page-cache growth.

Generates (once, cached under work/bench) a dense image, a sparse one, a small dense one and
a large sparse one. Capture part: the file is read so the page cache is hot, then for each run
times `b3sum FILE` (the reference: one blake3 hash of the whole file, all cores, mmap) and a
capture through a fresh vmard with an empty catalog (`vmarctl capture`, wall time of the
client), and reads vmard's peak RSS (VmHWM). Verify part: one vmard captures the large sparse
image (timed), then runs `vmarctl verify` on it; each verify reports bytes read and time, and
/proc/meminfo's Cached is read before and after it (growth = pages verify left behind).

Prints medians of N runs with the min..max spread (other jobs share the CPUs).

    tools/bench-capture.py [--dense-size 2G] [--sparse-size 4G] [--verify-size 64G]
                        [--verify-data-percent 5] [--runs 5] [--work DIR] [--skip-capture]
                        [--skip-verify] [--vmard VMARD]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from toollib import RELEASE, ROOT, build_release, cpu_seconds, peak_rss_kib, run

VMARD = RELEASE / "vmard"
TOOLS = ROOT / "target" / "tools"


def build():
    build_release()
    b3sum = TOOLS / "bin" / "b3sum"
    if not b3sum.exists():
        print("installing b3sum (the reference) with cargo ...", file=sys.stderr)
        run(["cargo", "install", "--quiet", "--locked", "b3sum", "--root", str(TOOLS)])
    return b3sum


def make_image(work, kind, size, data_percent=None):
    suffix = f"-{data_percent}pct" if data_percent is not None else ""
    path = work / f"{kind}-{size}{suffix}.raw"
    if not path.exists():
        print(f"generating {path.name} ...", file=sys.stderr)
        tmp = path.with_suffix(".tmp")
        extra = ["--data-percent", str(data_percent)] if data_percent is not None else []
        run([str(RELEASE / "make-test-images"), kind, str(tmp), "--size", size]
            + extra, stdout=subprocess.DEVNULL)
        tmp.rename(path)
    return path


def warm(path):
    """Reads the file's data (holes read as nothing) so both tools start from a hot cache."""
    run(["cat", str(path)], stdout=subprocess.DEVNULL)


def time_b3sum(b3sum, path):
    """Returns (wall seconds, CPU seconds: user + system) of one b3sum run."""
    before = os.times()
    start = time.perf_counter()
    run([str(b3sum), str(path)], stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    after = os.times()
    cpu = (after.children_user - before.children_user
           + after.children_system - before.children_system)
    return wall, cpu


def resident_bytes(path):
    """Bytes of `path` in the page cache (util-linux fincore, i.e. mincore)."""
    out = run(["fincore", "--bytes", "--noheadings", "--raw", "--output", "RES", str(path)],
              capture_output=True, text=True).stdout
    return int(out.split()[0])


def cached_bytes():
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("Cached:"):
                return int(line.split()[1]) * 1024
    return 0


@contextmanager
def daemon(image_dir):
    """A fresh vmard with an empty catalog; yields (vmarctl command prefix, pid)."""
    with tempfile.TemporaryDirectory(dir=image_dir) as tmp:
        socket = Path(tmp) / "vmard.sock"
        env = dict(os.environ, VMAR_LOG="warn")
        proc = subprocess.Popen([str(VMARD), "--state-dir", f"{tmp}/state",
                                 "--image-root", str(image_dir),
                                 "--socket", str(socket)], env=env)
        try:
            ctl = [str(RELEASE / "vmarctl"), "--socket", str(socket), "--json"]
            for _ in range(500):
                if subprocess.run(ctl + ["ping"], capture_output=True,
                                  check=False).returncode == 0:
                    break
                time.sleep(0.01)
            yield ctl, proc.pid
        finally:
            proc.terminate()
            proc.wait()


def capture(ctl, path):
    start = time.perf_counter()
    out = run(ctl + ["capture", str(path)], capture_output=True).stdout
    return time.perf_counter() - start, json.loads(out)["images"][0]["result"]


def time_capture(path):
    """Captures `path` with a fresh vmard and empty catalog; returns
    (wall seconds, result, peak RSS KiB, vmard CPU seconds)."""
    with daemon(path.parent) as (ctl, pid):
        cpu = cpu_seconds(pid)
        seconds, result = capture(ctl, path)
        return seconds, result, peak_rss_kib(pid), cpu_seconds(pid) - cpu


def spread(xs):
    return f"{min(xs):.3f}..{max(xs):.3f}"


def bench_capture(args, b3sum):
    images = [
        ("dense", make_image(args.work, "dense", args.dense_size)),
        ("sparse", make_image(args.work, "sparse", args.sparse_size)),
        ("dense-small", make_image(args.work, "dense", args.small_dense_size)),
    ]
    results = []
    for label, path in images:
        warm(path)
        # Interleaved, so that other jobs on the machine weigh on both alike.
        b3sums, captures = [], []
        for _ in range(args.runs):
            b3sums.append(time_b3sum(b3sum, path))
            captures.append(time_capture(path))
        b3 = [b[0] for b in b3sums]
        cap = [c[0] for c in captures]
        b3_cpu = [b[1] for b in b3sums]
        cap_cpu = [c[3] for c in captures]
        result = captures[0][1]
        scan = result["image"]["scan"]
        results.append({
            "image": label,
            "size_bytes": result["image"]["size"],
            "data_bytes_read": scan["bytes_read"],
            "hashed_blocks": scan["hashed_blocks"],
            "b3sum_seconds": b3,
            "capture_seconds": cap,
            "throughput_ratio": statistics.median(b3) / statistics.median(cap),
            "b3sum_cpu_seconds": b3_cpu,
            "capture_cpu_seconds": cap_cpu,
            "cpu_ratio": statistics.median(b3_cpu) / statistics.median(cap_cpu),
            "vmard_peak_rss_mib": max(c[2] for c in captures) / 1024,
            "digest_list_mib": scan["hashed_blocks"] * 40 / 2**20,
        })

    print(f"\ncapture vs b3sum, hot page cache, median of {args.runs} runs "
          f"(min..max), {os.cpu_count()} CPUs")
    print(f"{'image':<12} {'size':>6} {'data':>7} {'b3sum s':>8} {'capture s':>10} "
          f"{'b3sum GiB/s':>11} {'capture GiB/s':>13} {'ratio':>6} {'RSS MiB':>8} "
          f"{'digests MiB':>11}  spread b3sum / capture")
    for r in results:
        gib = r["size_bytes"] / 2**30
        b3, cap = statistics.median(r["b3sum_seconds"]), statistics.median(r["capture_seconds"])
        print(f"{r['image']:<12} {gib:>5.1f}G {r['data_bytes_read'] / 2**30:>6.2f}G "
              f"{b3:>8.3f} {cap:>10.3f} {gib / b3:>11.2f} {gib / cap:>13.2f} "
              f"{r['throughput_ratio']:>6.2f} {r['vmard_peak_rss_mib']:>8.1f} "
              f"{r['digest_list_mib']:>11.1f}  {spread(r['b3sum_seconds'])} / "
              f"{spread(r['capture_seconds'])}")
    print("ratio = capture throughput / b3sum throughput on the same file "
          "(>1: capture is faster)")
    print(f"\nCPU time (user + system; less sensitive to other jobs), median of {args.runs}")
    print(f"{'image':<12} {'b3sum CPU s':>11} {'vmard CPU s':>11} {'ratio':>6}")
    for r in results:
        print(f"{r['image']:<12} {statistics.median(r['b3sum_cpu_seconds']):>11.3f} "
              f"{statistics.median(r['capture_cpu_seconds']):>11.3f} {r['cpu_ratio']:>6.2f}")
    print("ratio = b3sum CPU time / vmard CPU time for the same file (>1: vmard needs less)")
    print(f"\nhashing alone (Scan::run without the catalog), {images[0][0]} image:")
    run([str(RELEASE / "bench-scan"), str(images[0][1]), str(args.runs)])
    return results


def bench_verify(args):
    path = make_image(args.work, "sparse", args.verify_size, args.verify_data_percent)
    warm(path)
    with daemon(path.parent) as (ctl, pid):
        cpu = cpu_seconds(pid)
        seconds, result = capture(ctl, path)
        capture_cpu = cpu_seconds(pid) - cpu
        name = result["image"]["name"]
        verifies = []
        for _ in range(args.runs):
            before = cached_bytes()
            resident = resident_bytes(path)
            cpu = cpu_seconds(pid)
            start = time.perf_counter()
            report = json.loads(run(ctl + ["verify", name], capture_output=True).stdout)
            elapsed = time.perf_counter() - start
            verifies.append({"seconds": elapsed, "cache_growth": cached_bytes() - before,
                             "image_growth": resident_bytes(path) - resident,
                             "image_resident": resident,
                             "cpu": cpu_seconds(pid) - cpu, "report": report})
        cold = []
        for _ in range(args.runs):
            fd = os.open(path, os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)
            resident = resident_bytes(path)
            start = time.perf_counter()
            report = json.loads(run(ctl + ["verify", name], capture_output=True).stdout)
            cold.append({"seconds": time.perf_counter() - start, "resident_before": resident,
                         "image_growth": resident_bytes(path) - resident, "report": report})
    secs = [v["seconds"] for v in verifies]
    growth = [v["cache_growth"] for v in verifies]
    last = verifies[-1]["report"]
    size = result["image"]["size"]
    print(f"\nverify of a sparse {size / 2**30:.0f} GiB image "
          f"({result['image']['scan']['bytes_read'] / 2**30:.2f} GiB data), hot page cache, "
          f"median of {args.runs} runs (min..max)")
    vcpu = [v["cpu"] for v in verifies]
    print(f"capture (one run)       {seconds:8.3f} s, vmard CPU {capture_cpu:.3f} s")
    print(f"verify                  {statistics.median(secs):8.3f} s  ({spread(secs)}), "
          f"{statistics.median(secs) / seconds:.2f}x the capture time; vmard CPU "
          f"{statistics.median(vcpu):.3f} s")
    print(f"verify read             {last.get('bytes_read', 0) / 2**30:8.3f} GiB, "
          f"{last.get('bytes_compared', 0) / 2**30:.1f} GiB compared through the map, "
          f"ok={last['ok']}")
    image_growth = [v["image_growth"] for v in verifies]
    print(f"image's cached bytes    {verifies[0]['image_resident'] / 2**30:8.3f} GiB before verify, "
          f"growth {statistics.median(image_growth) / 2**20:.1f} MiB "
          f"({min(image_growth) / 2**20:.1f}..{max(image_growth) / 2**20:.1f}) (fincore)")
    csecs = [v["seconds"] for v in cold]
    cgrowth = [v["image_growth"] for v in cold]
    print(f"verify, image dropped from the cache first (POSIX_FADV_DONTNEED): "
          f"{statistics.median(csecs):.3f} s ({spread(csecs)}), "
          f"{statistics.median(csecs) / seconds:.2f}x the capture time; image's cached bytes "
          f"{cold[0]['resident_before'] / 2**20:.1f} MiB before, growth "
          f"{statistics.median(cgrowth) / 2**20:.1f} MiB ({min(cgrowth) / 2**20:.1f}.."
          f"{max(cgrowth) / 2**20:.1f}); read {cold[-1]['report'].get('bytes_read', 0) / 2**20:.1f}"
          f" MiB, dropped {cold[-1]['report'].get('bytes_dropped', 0) / 2**20:.1f} MiB")
    print(f"page cache growth       {statistics.median(growth) / 2**20:8.1f} MiB "
          f"({min(growth) / 2**20:.1f}..{max(growth) / 2**20:.1f}) "
          "(/proc/meminfo Cached after - before; other jobs move it too)")
    return {"capture_seconds": seconds, "capture_cpu_seconds": capture_cpu,
            "verify_seconds": secs, "verify_cpu_seconds": vcpu, "cache_growth_bytes": growth,
            "image_growth_bytes": image_growth, "cold": cold,
            "report": last}


def main():
    global VMARD
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dense-size", default="2G")
    parser.add_argument("--sparse-size", default="4G")
    parser.add_argument("--small-dense-size", default="512M",
                        help="a second dense image, to show how RSS grows with image size")
    parser.add_argument("--verify-size", default="64G")
    parser.add_argument("--verify-data-percent", type=int, default=5)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--work", type=Path, default=ROOT / "work" / "bench")
    parser.add_argument("--skip-capture", action="store_true")
    parser.add_argument("--skip-verify", action="store_true")
    parser.add_argument("--vmard", type=Path, default=VMARD,
                        help="the vmard binary to measure (e.g. a copy built from another "
                        "commit, for a before/after comparison)")
    args = parser.parse_args()
    VMARD = args.vmard.resolve()

    args.work.mkdir(parents=True, exist_ok=True)
    b3sum = build()
    out = {}
    if not args.skip_capture:
        out["capture"] = bench_capture(args, b3sum)
    if not args.skip_verify:
        out["verify"] = bench_verify(args)
    path = args.work / "results.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"results in {path}")


if __name__ == "__main__":
    main()
