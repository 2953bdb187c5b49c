//! The prefetch mechanism on this host, without VMs: a family of IMAGES images that share
//! most of their blocks is written and captured into a catalog, each gets a synthetic boot
//! working set (RUNS runs of 1-16 blocks common to the family at the same places, plus a
//! fifth as many of its own), and
//! the sets are warmed from a cold page cache (`POSIX_FADV_DONTNEED` of every image file,
//! checked with `mincore`) in four ways, ROUNDS times each, interleaved:
//!
//! - `plain+per-image`: each image's own set read from its own file (no dedup; the honest
//!   baseline "plain images + per-image prefetch"), same merging and reader as vmar's;
//! - `vmar per-image`: `vmar::prefetch::plan` + `execute` of one image after the other
//!   (later images skip what earlier ones cached);
//! - `vmar union`: one plan for all images (each canonical block once);
//! - `vmar union, no gap merge`: the same with `max_gap` 0.
//!
//! Prints bytes read, requests, `pread` calls, and the time to warm (medians with ranges),
//! and each one's time and bytes over the baseline's, measured in the same run.
//!
//!     cargo run --release -p vmar-devtools --bin bench-prefetch -- [DIR] [--images 4]
//!         [--size-mib 1024] [--rounds 5] [--runs 1000]

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use vmar::catalog::Catalog;
use vmar::image::{BLOCK_SIZE, ImageFile};
use vmar::prefetch::io;
use vmar::workset::{self, Canonical, MergePolicy, Run, WorkingSet};

/// xorshift64*: reproducible pseudo-random numbers.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// Fills `block` with content from `seed` (never all zero).
fn fill(block: &mut [u8], seed: u64) {
    let mut rng = Rng((seed << 1) | 1);
    for word in block.chunks_exact_mut(8) {
        word.copy_from_slice(&rng.next().to_le_bytes());
    }
}

/// Writes image `i` of the family: the base content, with every tenth 64-block chunk (a
/// different tenth per image) its own.
fn write_image(path: &Path, i: u64, blocks: u64) -> Result<()> {
    let mut file = std::io::BufWriter::with_capacity(
        1 << 20,
        File::create(path).with_context(|| format!("cannot create {}", path.display()))?,
    );
    let mut block = vec![0u8; usize::try_from(BLOCK_SIZE)?];
    for b in 0..blocks {
        let own = i > 0 && (b / 64) % 10 == i % 10;
        fill(&mut block, if own { (i << 40) ^ b ^ 0xABCD } else { b });
        file.write_all(&block)?;
    }
    file.into_inner()
        .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))?
        .sync_all()?;
    Ok(())
}

/// Boot-like runs: `count` runs of 1 to 16 blocks at random places of `blocks`.
fn runs(rng: &mut Rng, count: usize, blocks: u64) -> Vec<Run> {
    (0..count)
        .map(|_| Run {
            start: rng.below(blocks - 16),
            len: 1 + rng.below(16),
        })
        .collect()
}

fn median_range(mut xs: Vec<f64>) -> (f64, f64, f64) {
    xs.sort_by(f64::total_cmp);
    (xs[xs.len() / 2], xs[0], xs[xs.len() - 1])
}

/// What one way of warming did in one round.
#[derive(Clone, Copy, Default)]
struct Round {
    bytes: u64,
    requests: u64,
    reads: u64,
    seconds: f64,
}

/// Seconds the reads of `r` would take at 200 requests/s and 100 MB/s (the throttled disk
/// of tools/bench-instantiate.py's runs in docs/benchmarks.md), one request per `pread`.
fn model(r: Round) -> f64 {
    r.reads as f64 / 200.0 + r.bytes as f64 / 100e6
}

fn drop_all(paths: &[PathBuf]) -> Result<u64> {
    let mut cached = 0;
    for p in paths {
        io::drop_cache(p)?;
        cached += vmar::sys::residency(p, std::fs::metadata(p)?.len())?.cached_bytes();
    }
    Ok(cached)
}

/// The baseline: each image's own set from its own file.
fn plain(paths: &[PathBuf], sets: &[Vec<Run>], size: u64) -> Round {
    let started = Instant::now();
    let mut round = Round::default();
    for (i, (path, runs)) in paths.iter().zip(sets).enumerate() {
        let id = u32::try_from(i).unwrap_or(u32::MAX);
        let own: Vec<Canonical> = runs
            .iter()
            .map(|r| Canonical {
                image: id,
                start: r.start,
                len: r.len,
            })
            .collect();
        let requests = workset::requests(&workset::union(own), |_| size, MergePolicy::default());
        let open = |_| io::open_for_reading(path).ok().map(|f| (f, String::new()));
        let out = io::read_requests(&open, &requests, &|| false, &mut |_| {});
        round.bytes += out.bytes;
        round.requests += requests.len() as u64;
        round.reads += out.reads;
    }
    round.seconds = started.elapsed().as_secs_f64();
    round
}

fn vmar_warm(catalog: &Catalog, names: &[Vec<String>], policy: MergePolicy) -> Result<Round> {
    let started = Instant::now();
    let mut round = Round::default();
    for group in names {
        let plan = vmar::prefetch::plan(catalog, group, None, u64::MAX, policy)?;
        let report = plan.execute(&|| false, &mut |_| {});
        if !report.errors.is_empty() {
            bail!("warm failed: {:?}", report.errors);
        }
        round.bytes += report.read_bytes;
        round.requests += report.requests;
        round.reads += report.reads;
    }
    round.seconds = started.elapsed().as_secs_f64();
    Ok(round)
}

fn main() -> Result<()> {
    let mut dir = PathBuf::from("work/bench-prefetch");
    let (mut images, mut size_mib, mut rounds, mut common_runs) = (4u64, 1024u64, 5usize, 1000);
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().context("option without a value");
        match arg.as_str() {
            "--images" => images = value()?.parse()?,
            "--size-mib" => size_mib = value()?.parse()?,
            "--rounds" => rounds = value()?.parse()?,
            "--runs" => common_runs = value()?.parse()?,
            other if !other.starts_with('-') => dir = PathBuf::from(other),
            other => bail!("unknown option {other}"),
        }
    }
    if images < 2 || size_mib < 4 || rounds == 0 {
        bail!("give at least 2 images of 4 MiB and 1 round");
    }
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("images"))?;
    let blocks = size_mib * (1 << 20) / BLOCK_SIZE;
    let size = blocks * BLOCK_SIZE;
    let paths: Vec<PathBuf> = (0..images)
        .map(|i| dir.join(format!("images/img{i}.raw")))
        .collect();
    let started = Instant::now();
    for (i, p) in paths.iter().enumerate() {
        write_image(p, i as u64, blocks)?;
    }
    let catalog = Catalog::open(&dir.join("state"))?;
    let mut names = Vec::new();
    for p in &paths {
        let (record, _) = catalog.capture(&ImageFile::open(p)?, None, false, &mut |_| {})?;
        names.push(record.name);
    }
    // Working sets: RUNS runs common to the family, a fifth as many of each image's own
    // (the traced boots of docs/benchmarks.md: ~40 MiB in ~1,000 requests of a 3 GiB image,
    // 90% of it content other images read too).
    let mut rng = Rng(0x5EED);
    let common = runs(&mut rng, common_runs, blocks);
    let mut sets = Vec::new();
    for name in &names {
        let mut mine = common.clone();
        mine.extend(runs(&mut rng, common_runs / 5, blocks));
        let runs = workset::normalize(mine);
        let id = catalog.image(name)?.id;
        catalog.save_working_set(
            id,
            "boot",
            &WorkingSet {
                seen: vec![1; runs.len()],
                runs: runs.clone(),
                recordings: 1,
                updated: 0,
            },
        )?;
        sets.push(runs);
    }
    let set_bytes: u64 = sets.iter().map(|s| workset::blocks(s) * BLOCK_SIZE).sum();
    let plan = vmar::prefetch::plan(&catalog, &names, None, u64::MAX, MergePolicy::default())?;
    println!(
        "{images} images of {size_mib} MiB in {} (written and captured in {:.1} s); working sets {:.1} MiB in all, union of canonical extents {:.1} MiB; {rounds} rounds from a cold cache",
        dir.display(),
        started.elapsed().as_secs_f64(),
        set_bytes as f64 / 1048576.0,
        plan.report.union_bytes as f64 / 1048576.0
    );
    for image in &plan.report.images {
        println!(
            "  {}: set {:.1} MiB, {:.1} MiB to read",
            image.image,
            image.bytes as f64 / 1048576.0,
            image.canonical_bytes as f64 / 1048576.0
        );
    }
    let per_image: Vec<Vec<String>> = names.iter().map(|n| vec![n.clone()]).collect();
    let ways = [
        "plain+per-image",
        "vmar per-image",
        "vmar union",
        "vmar union, no gap merge",
    ];
    let mut results: Vec<Vec<Round>> = vec![Vec::new(); ways.len()];
    let mut left_cached = 0;
    for _ in 0..rounds {
        for (w, result) in results.iter_mut().enumerate() {
            left_cached = left_cached.max(drop_all(&paths)?);
            let round = match w {
                0 => plain(&paths, &sets, size),
                1 => vmar_warm(&catalog, &per_image, MergePolicy::default())?,
                2 => vmar_warm(&catalog, &[names.clone()], MergePolicy::default())?,
                _ => vmar_warm(
                    &catalog,
                    &[names.clone()],
                    MergePolicy {
                        max_gap: 0,
                        ..MergePolicy::default()
                    },
                )?,
            };
            result.push(round);
        }
    }
    if left_cached > 0 {
        println!(
            "note: up to {:.1} MiB of the images stayed cached after dropping (mapped or dirty pages)",
            left_cached as f64 / 1048576.0
        );
    }
    println!(
        "{:<26} {:>9} {:>9} {:>8} {:>26} {:>10} {:>10} {:>9}",
        "way",
        "MiB read",
        "requests",
        "preads",
        "seconds median [min-max]",
        "time/base",
        "bytes/base",
        "model s"
    );
    let base_time = median_range(results[0].iter().map(|r| r.seconds).collect()).0;
    let base_bytes = results[0][0].bytes as f64;
    for (way, rounds) in ways.iter().zip(&results) {
        let (t, lo, hi) = median_range(rounds.iter().map(|r| r.seconds).collect());
        let r = rounds[0];
        println!(
            "{way:<26} {:>9.1} {:>9} {:>8} {:>9.3} [{lo:.3}-{hi:.3}] {:>10.2} {:>10.2} {:>9.2}",
            r.bytes as f64 / 1048576.0,
            r.requests,
            r.reads,
            t,
            t / base_time,
            r.bytes as f64 / base_bytes,
            model(r)
        );
    }
    println!(
        "model s: not measured; what the preads would take on the throttled disk of docs/benchmarks.md (200 requests/s, 100 MB/s), one request per pread"
    );
    interference(&catalog, &names, &paths, rounds)?;
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

/// Seconds a "VM" takes for 2,000 random 4 KiB O_DIRECT reads of the last image (the disk,
/// never the cache), while `warm` runs beside it on another thread.
fn foreground(path: &Path, warm: Option<Box<dyn FnOnce() + Send>>) -> Result<(f64, f64)> {
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_DIRECT)
        .open(path)?;
    let blocks = file.metadata()?.len() / BLOCK_SIZE;
    let mut buffer = vec![0u8; 8192];
    let aligned = buffer.as_ptr().align_offset(4096);
    let chunk = &mut buffer[aligned..aligned + 4096];
    let mut rng = Rng(0xF00D);
    let background = warm.map(|w| {
        std::thread::spawn(move || {
            let started = Instant::now();
            w();
            started.elapsed().as_secs_f64()
        })
    });
    let started = Instant::now();
    for _ in 0..2000 {
        file.read_at(chunk, rng.below(blocks) * BLOCK_SIZE)?;
    }
    let seconds = started.elapsed().as_secs_f64();
    let warm_seconds = match background {
        Some(b) => b.join().map_err(|_| anyhow::anyhow!("warm panicked"))?,
        None => 0.0,
    };
    Ok((seconds, warm_seconds))
}

/// How a warm shares the disk with a VM's reads: the VM alone, beside a union warm in the
/// idle class (what vmard does), and beside the same reads at the VM's own priority.
fn interference(
    catalog: &Catalog,
    names: &[String],
    paths: &[PathBuf],
    rounds: usize,
) -> Result<()> {
    // The I/O scheduler of the disk the images are on (a partition's is its disk's).
    let dev = std::os::unix::fs::MetadataExt::dev(&std::fs::metadata(&paths[0])?);
    let sys = format!(
        "/sys/dev/block/{}:{}",
        nix::sys::stat::major(dev),
        nix::sys::stat::minor(dev)
    );
    let scheduler = std::fs::read_to_string(format!("{sys}/queue/scheduler"))
        .or_else(|_| std::fs::read_to_string(format!("{sys}/../queue/scheduler")))
        .unwrap_or_else(|_| "unknown".into());
    let vm_image = paths.last().context("no image")?.clone();
    let mut rows: Vec<(&str, Vec<f64>, Vec<f64>)> = vec![
        ("VM alone", Vec::new(), Vec::new()),
        ("VM + warm, idle class", Vec::new(), Vec::new()),
        ("VM + warm, VM's class", Vec::new(), Vec::new()),
    ];
    for _ in 0..rounds {
        for (i, row) in rows.iter_mut().enumerate() {
            drop_all(paths)?;
            let plan =
                vmar::prefetch::plan(catalog, names, None, u64::MAX, MergePolicy::default())?;
            let warm: Option<Box<dyn FnOnce() + Send>> = match i {
                0 => None,
                1 => Some(Box::new(move || {
                    plan.execute(&|| false, &mut |_| {});
                })),
                _ => {
                    let requests = plan.requests.clone();
                    let files: Vec<(u32, PathBuf)> = requests
                        .iter()
                        .map(|r| r.image)
                        .collect::<std::collections::BTreeSet<_>>()
                        .into_iter()
                        .map(|id| Ok((id, catalog.image_by_id(id)?.path)))
                        .collect::<Result<_>>()?;
                    Some(Box::new(move || {
                        let open = |id: u32| {
                            let path = &files.iter().find(|(i, _)| *i == id)?.1;
                            io::open_for_reading(path).ok().map(|f| (f, String::new()))
                        };
                        io::read_requests(&open, &requests, &|| false, &mut |_| {});
                    }))
                }
            };
            let (vm, warm) = foreground(&vm_image, warm)?;
            row.1.push(vm);
            row.2.push(warm);
        }
    }
    println!(
        "\nsharing the disk (scheduler: {}): a VM's 2,000 random 4 KiB O_DIRECT reads, {rounds} rounds",
        scheduler.trim()
    );
    println!(
        "{:<24} {:>26} {:>10} {:>14}",
        "", "VM seconds median [min-max]", "VM/alone", "warm seconds"
    );
    let alone = median_range(rows[0].1.clone()).0;
    for (label, vm, warm) in rows {
        let (t, lo, hi) = median_range(vm);
        let w = median_range(warm).0;
        println!(
            "{label:<24} {t:>9.3} [{lo:.3}-{hi:.3}] {:>10.2} {w:>14.3}",
            t / alone
        );
    }
    Ok(())
}
