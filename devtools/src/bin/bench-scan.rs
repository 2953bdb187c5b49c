//! Times `Scan::run` of a file with a consumer that only counts: the hashing pipeline of a
//! capture without the catalog, once per way of reading (mapped windows, copied with pread),
//! against the reference measured in the same run: blake3 of the whole file as one input,
//! mapped and hashed on all cores (what `b3sum` does). Runs are interleaved (reference,
//! mapped, copied, reference, ...) so that other jobs on the machine weigh on all alike.
//! Prints wall and CPU time (user + system of this process), medians of RUNS with min..max,
//! throughput as a ratio to the reference, and the peak RSS of each (VmHWM, reset before
//! each run through /proc/self/clear_refs).
//!
//!     cargo run --release -p vmar-devtools --bin bench-scan -- FILE [RUNS]

use std::fs::File;
use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};
use vmar::scan::{Read, Scan};

/// User + system CPU seconds of this process so far.
fn cpu_seconds() -> Result<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat")?;
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .context("malformed /proc/self/stat")?
        .1
        .split_whitespace()
        .collect();
    let ticks: f64 = fields[11].parse::<f64>()? + fields[12].parse::<f64>()?;
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)?.unwrap_or(100) as f64;
    Ok(ticks / hz)
}

/// Median and range of `xs`.
fn stats(xs: &[f64]) -> (f64, f64, f64) {
    let mut xs = xs.to_vec();
    xs.sort_by(f64::total_cmp);
    (xs[xs.len() / 2], xs[0], xs[xs.len() - 1])
}

/// Resets this process's peak RSS (VmHWM) to its current RSS.
fn reset_peak_rss() -> Result<()> {
    std::fs::write("/proc/self/clear_refs", "5").context("cannot reset VmHWM")
}

/// Peak RSS of this process in MiB since the last reset.
fn peak_rss_mib() -> Result<f64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .context("no VmHWM in /proc/self/status")?
        .trim()
        .trim_end_matches(" kB")
        .parse()?;
    Ok(kib / 1024.0)
}

/// One timed run: (wall seconds, CPU seconds, peak RSS MiB).
fn timed(work: impl FnOnce() -> Result<()>) -> Result<(f64, f64, f64)> {
    reset_peak_rss()?;
    let (cpu, start) = (cpu_seconds()?, Instant::now());
    work()?;
    let wall = start.elapsed().as_secs_f64();
    Ok((wall, cpu_seconds()? - cpu, peak_rss_mib()?))
}

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let path = args.next().context("usage: bench-scan FILE [RUNS]")?;
    let runs: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(5);
    let file = File::open(&path).with_context(|| format!("cannot open {path}"))?;
    let size = file.metadata()?.len();
    let gib = size as f64 / (1u64 << 30) as f64;
    println!(
        "scan of {path} ({gib:.2} GiB), median (min..max) of {runs} interleaved runs, \
         hashing only (no catalog)"
    );
    let names = ["b3sum-like", "Mapped", "Copied"];
    let mut results: Vec<Vec<(f64, f64, f64)>> = vec![Vec::new(); names.len()];
    for _ in 0..runs {
        results[0].push(timed(|| {
            let mut hasher = blake3::Hasher::new();
            hasher.update_mmap_rayon(&path)?;
            std::hint::black_box(hasher.finalize());
            Ok(())
        })?);
        for (n, read) in [(1, Read::Mapped), (2, Read::Copied)] {
            results[n].push(timed(|| {
                let mut hashed = 0u64;
                Scan::new(&file, size, Path::new(&path))?
                    .read(read)
                    .run(|batch| {
                        hashed += batch.digests.len() as u64;
                        Ok(())
                    })?;
                std::hint::black_box(hashed);
                Ok(())
            })?);
        }
    }
    println!(
        "{:<11} {:>22} {:>8} {:>7} {:>6} {:>9} {:>9}",
        "read", "wall s", "CPU s", "GiB/s", "ratio", "CPU ratio", "peak RSS"
    );
    let column = |n: usize, f: fn(&(f64, f64, f64)) -> f64| -> Vec<f64> {
        results[n].iter().map(f).collect()
    };
    let (ref_wall, _, _) = stats(&column(0, |r| r.0));
    let (ref_cpu, _, _) = stats(&column(0, |r| r.1));
    for (n, name) in names.iter().enumerate() {
        let (wall, lo, hi) = stats(&column(n, |r| r.0));
        let (cpu, _, _) = stats(&column(n, |r| r.1));
        let rss = column(n, |r| r.2).into_iter().fold(0.0, f64::max);
        println!(
            "{name:<11} {:>22} {cpu:>8.3} {:>7.2} {:>6.2} {:>9.2} {rss:>5.1} MiB",
            format!("{wall:.3} ({lo:.3}..{hi:.3})"),
            gib / wall,
            ref_wall / wall,
            ref_cpu / cpu,
        );
    }
    println!(
        "ratio: throughput / the b3sum-like reference's (1 = as fast); CPU ratio: reference \
         CPU / this CPU; peak RSS includes the mapped pages of the file"
    );
    Ok(())
}
