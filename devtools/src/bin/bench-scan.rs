//! Times `Scan::run` of a file with a consumer that only counts: the hashing pipeline of a
//! capture without the catalog, once per way of reading (mapped, copied with pread). Prints
//! wall and CPU time (user + system of this process: steadier than wall time when other jobs
//! share the CPUs), medians of RUNS, and the ratio of each to the mapped read.
//!
//!     cargo run --release --example bench-scan -- FILE [RUNS]

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

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let path = args.next().context("usage: bench-scan FILE [RUNS]")?;
    let runs: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(5);
    let file = File::open(&path).with_context(|| format!("cannot open {path}"))?;
    let size = file.metadata()?.len();
    let gib = size as f64 / (1u64 << 30) as f64;
    println!("scan of {path} ({gib:.2} GiB), median of {runs} runs, hashing only (no catalog)");
    println!(
        "{:<8} {:>8} {:>8} {:>9} {:>10}",
        "read", "wall s", "CPU s", "GiB/s", "CPU ratio"
    );
    let mut mapped_cpu = None;
    for read in [Read::Mapped, Read::Copied] {
        let (mut walls, mut cpus) = (Vec::new(), Vec::new());
        for _ in 0..runs {
            let (cpu, start) = (cpu_seconds()?, Instant::now());
            let mut hashed = 0u64;
            Scan::new(&file, size, Path::new(&path))?
                .read(read)
                .run(|batch| {
                    hashed += batch.digests.len() as u64;
                    Ok(())
                })?;
            walls.push(start.elapsed().as_secs_f64());
            cpus.push(cpu_seconds()? - cpu);
            std::hint::black_box(hashed);
        }
        let (wall, cpu) = (median(walls), median(cpus));
        let base = *mapped_cpu.get_or_insert(cpu);
        println!(
            "{:<8} {wall:>8.3} {cpu:>8.3} {:>9.2} {:>10.2}",
            format!("{read:?}"),
            gib / wall,
            cpu / base
        );
    }
    Ok(())
}
