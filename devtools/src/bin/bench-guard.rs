//! What the image guard's checks of a block-device image cost: choosing and loading the
//! sample pool from the catalog (streams every stored digest of the image), checking the
//! whole pool as create, refresh and restore do (1,024 `O_DIRECT` block reads and hashes),
//! and one periodic check (64 of them), against reading and hashing the whole image in the
//! same run (what finding every change would cost). Needs root: the image is a loop device
//! over a file of random data (so reads come from the page cache under the loop device, not
//! a disk: the I/O figures are a floor). Prints medians of RUNS runs with their ranges.
//!
//!     cargo run --release -p vmar-devtools --bin bench-guard [MIB] [RUNS]

use std::io::{Read, Write};
use std::time::Instant;

use anyhow::{Context, Result};
use vmar::catalog::Catalog;
use vmar::image::ImageFile;
use vmar::sample::{self, PLAN_SAMPLES};

fn stats(mut xs: Vec<f64>) -> (f64, f64, f64) {
    xs.sort_by(f64::total_cmp);
    (xs[xs.len() / 2], xs[0], xs[xs.len() - 1])
}

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let mib: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(1024);
    let runs: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(7);
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("image.raw");
    {
        let mut out = std::fs::File::create(&file)?;
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let mut chunk = vec![0u8; 1 << 20];
        for _ in 0..mib {
            for word in chunk.chunks_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                word.copy_from_slice(&x.to_le_bytes());
            }
            out.write_all(&chunk)?;
        }
        out.sync_all()?;
    }
    let control = loopdev::LoopControl::open().context("loop devices need root")?;
    let device = control.next_free()?;
    device.with().read_only(true).attach(&file)?;
    let node = device.path().context("loop device node")?;
    let result = run(dir.path(), &node, mib, runs);
    let _ = device.detach();
    result
}

fn run(dir: &std::path::Path, node: &std::path::Path, mib: usize, runs: usize) -> Result<()> {
    let catalog = Catalog::open(&dir.join("state"))?;
    let image = ImageFile::open(node)?;
    let (record, _) = catalog.capture(&image, Some("bench"), false, &mut |_| {})?;
    let time = |f: &mut dyn FnMut() -> Result<()>| -> Result<(f64, f64, f64)> {
        f()?;
        let mut xs = Vec::new();
        for _ in 0..runs {
            let start = Instant::now();
            f()?;
            xs.push(start.elapsed().as_secs_f64());
        }
        Ok(stats(xs))
    };
    let direct = sample::open_direct(node)?;
    let load = time(&mut || {
        sample::load(&catalog, &record, PLAN_SAMPLES)?;
        Ok(())
    })?;
    let mut pool = sample::load(&catalog, &record, PLAN_SAMPLES)?;
    let full_pool = time(&mut || {
        anyhow::ensure!(pool.check(&direct, node, record.size, 0)?.is_none());
        Ok(())
    })?;
    let periodic = time(&mut || {
        anyhow::ensure!(pool.check(&direct, node, record.size, 64)?.is_none());
        Ok(())
    })?;
    let counters = time(&mut || {
        let number = record.identity.block_device().context("a block device")?;
        sample::writes(number).context("stat")?;
        Ok(())
    })?;
    let whole = time(&mut || {
        let mut f = std::fs::File::open(node)?;
        let mut buf = vec![0u8; 1 << 20];
        let mut hasher = blake3::Hasher::new();
        loop {
            let n = f.read(&mut buf)?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
        }
        std::hint::black_box(hasher.finalize());
        Ok(())
    })?;
    println!(
        "block-device image of {mib} MiB (loop device over a cached file), median [min-max] of {runs} runs"
    );
    println!(
        "{:<52} {:>10} {:>22} {:>12}",
        "step", "ms", "range ms", "vs whole"
    );
    let row = |name: &str, (m, lo, hi): (f64, f64, f64)| {
        println!(
            "{name:<52} {:>10.3} {:>10.3}-{:<11.3} {:>12.5}",
            m * 1e3,
            lo * 1e3,
            hi * 1e3,
            m / whole.0
        );
    };
    row("load a pool of 1024 samples (streams all digests)", load);
    row("check the whole pool (create/refresh/restore)", full_pool);
    row("one periodic check (64 samples)", periodic);
    row("read the write counters (sysfs)", counters);
    row("reference: read and hash the whole image", whole);
    Ok(())
}
