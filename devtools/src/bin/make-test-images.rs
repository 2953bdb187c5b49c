//! Generates raw test images with realistic sharing, for the demo and the benchmarks.
//!
//! A "family" is a base OS image and derived images that keep most of the base's files at the
//! same place (a few updated), add files of their own, and leave the rest as holes, like VM
//! images installed from one template. "dense" and "sparse" make one large image for capture
//! throughput. Content is pseudo-random per file, reproducible from a seed, so files shared
//! between images are byte-identical and everything else is unique.
//!
//! ```text
//! make-test-images family DIR [--count 3] [--size 64M] [--shuffle]
//! make-test-images dense FILE --size 2G
//! make-test-images sparse FILE --size 4G [--data-percent 25 | --data-size 1G]
//! ```

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use vmar::units::usize_of;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

const BLOCK: u64 = 4096;

#[derive(Parser)]
struct Args {
    #[command(subcommand)]
    kind: Kind,
}

#[derive(Subcommand)]
enum Kind {
    /// A base image and derived images sharing most of its blocks.
    Family {
        dir: PathBuf,
        #[arg(long, default_value_t = 3)]
        count: u32,
        /// Size of each image (K, M, G, T suffixes).
        #[arg(long, default_value = "64M", value_parser = parse_size)]
        size: u64,
        /// Each derived image places the base's files in an order of its own (the same
        /// content at different blocks, as after installing from packages rather than
        /// cloning a template): maps redirect file by file instead of in long runs.
        #[arg(long)]
        shuffle: bool,
    },
    /// One image with every block written: files, some duplicated, and ~5% zero blocks.
    Dense {
        file: PathBuf,
        #[arg(long, value_parser = parse_size)]
        size: u64,
    },
    /// One sparse image: files on `data-percent` of it, holes elsewhere.
    Sparse {
        file: PathBuf,
        #[arg(long, value_parser = parse_size)]
        size: u64,
        #[arg(long, default_value_t = 25)]
        data_percent: u64,
        /// Bytes of data instead of a percentage (e.g. 8G in a 1T image).
        #[arg(long, value_parser = parse_size, conflicts_with = "data_percent")]
        data_size: Option<u64>,
    },
}

fn parse_size(text: &str) -> Result<u64, String> {
    let (digits, unit) = match text.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((i, _)) => text.split_at(i),
        None => (text, ""),
    };
    let n: u64 = digits.parse().map_err(|e| format!("{text}: {e}"))?;
    let mult = match unit {
        "" => 1,
        "K" | "k" => 1 << 10,
        "M" | "m" => 1 << 20,
        "G" | "g" => 1 << 30,
        "T" | "t" => 1 << 40,
        other => return Err(format!("unknown unit {other:?}")),
    };
    let size = n * mult;
    if size == 0 || !size.is_multiple_of(BLOCK) {
        return Err(format!("{text}: size must be a non-zero multiple of 4 KiB"));
    }
    Ok(size)
}

/// splitmix64: a small, fast, reproducible generator.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// A file: `blocks` blocks of content from `seed`, at block `at` of the image.
#[derive(Clone, Copy)]
struct FileExtent {
    at: u64,
    blocks: u64,
    seed: u64,
}

/// Fills `buf` with the content of file `seed` starting at its block `first`. Every block
/// differs, and one in 64 file blocks is all zero (sparse regions inside files).
fn fill(buf: &mut [u8], seed: u64, first: u64) {
    for (i, block) in buf.chunks_mut(usize_of(BLOCK)).enumerate() {
        let index = first + i as u64;
        let mut rng = Rng(seed.wrapping_mul(0x1000_0000_01B3) ^ index);
        if rng.next().is_multiple_of(64) {
            block.fill(0);
            continue;
        }
        for word in block.chunks_mut(8) {
            word.copy_from_slice(&rng.next().to_le_bytes()[..word.len()]);
        }
    }
}

/// Writes the files into a new sparse image of `size` bytes.
fn write_image(path: &Path, size: u64, files: &[FileExtent]) -> Result<()> {
    let file = File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    file.set_len(size)?;
    let mut buf = vec![0u8; usize_of(256 * BLOCK)];
    for f in files {
        let mut done = 0;
        while done < f.blocks {
            let n = (f.blocks - done).min(256);
            let part = &mut buf[..usize_of(n * BLOCK)];
            fill(part, f.seed, done);
            file.write_all_at(part, (f.at + done) * BLOCK)?;
            done += n;
        }
    }
    file.sync_all()?;
    Ok(())
}

/// Places files of 1..=max_blocks blocks one after another from `start`, leaving gaps, until
/// `data_blocks` blocks are used or `end` is reached.
fn place_files(
    rng: &mut Rng,
    start: u64,
    end: u64,
    data_blocks: u64,
    max_blocks: u64,
    gap_blocks: u64,
) -> Vec<FileExtent> {
    let mut files = Vec::new();
    let mut at = start;
    let mut used = 0;
    while used < data_blocks && at < end {
        let blocks = (1 + rng.below(max_blocks))
            .min(end - at)
            .min(data_blocks - used);
        files.push(FileExtent {
            at,
            blocks,
            seed: rng.next(),
        });
        used += blocks;
        at += blocks + rng.below(gap_blocks + 1);
    }
    files
}

fn family(dir: &Path, count: u32, size: u64, shuffle: bool) -> Result<()> {
    if count < 1 {
        bail!("--count must be at least 1");
    }
    std::fs::create_dir_all(dir)?;
    let blocks = size / BLOCK;
    let mut rng = Rng(42);
    // The OS takes the first 40% of the image, about 60% of it written.
    let os_end = blocks * 2 / 5;
    let base = place_files(&mut rng, 0, os_end, os_end * 3 / 5, 64, 48);
    let names = ["base", "web", "db", "dev", "ci", "cache", "mail", "proxy"];
    for n in 0..count {
        let name = names
            .get(n as usize)
            .map(|s| s.to_string())
            .unwrap_or(format!("app{n}"));
        let mut files = base.clone();
        if n > 0 && shuffle {
            shuffled(&mut rng, &mut files);
        }
        if n > 0 {
            // Updated packages: about 3% of the base's files differ in this image.
            for f in files.iter_mut() {
                if rng.below(100) < 3 {
                    f.seed = rng.next();
                }
            }
            // The application's own files, after the OS.
            let app_start = os_end + rng.below(blocks / 20 + 1);
            files.extend(place_files(
                &mut rng,
                app_start,
                blocks,
                blocks / 8,
                128,
                16,
            ));
        }
        let path = dir.join(format!("{name}.raw"));
        write_image(&path, size, &files)?;
        println!("{}", path.display());
    }
    Ok(())
}

/// Moves `files` (laid out one after another with gaps) into a random order over the same
/// span, keeping each file's length and the gap after it.
fn shuffled(rng: &mut Rng, files: &mut [FileExtent]) {
    let Some(start) = files.first().map(|f| f.at) else {
        return;
    };
    let gaps: Vec<u64> = files
        .windows(2)
        .map(|w| w[1].at - (w[0].at + w[0].blocks))
        .chain([0])
        .collect();
    let mut order: Vec<(FileExtent, u64)> = files.iter().copied().zip(gaps).collect();
    // Fisher-Yates.
    for i in (1..order.len()).rev() {
        let j = usize_of(rng.below(i as u64 + 1));
        order.swap(i, j);
    }
    let mut at = start;
    for (slot, (mut file, gap)) in files.iter_mut().zip(order) {
        file.at = at;
        at += file.blocks + gap;
        *slot = file;
    }
}

fn dense(path: &Path, size: u64) -> Result<()> {
    let blocks = size / BLOCK;
    let mut rng = Rng(7);
    let mut files = place_files(&mut rng, 0, blocks, blocks, 256, 0);
    // One file in five is a copy of an earlier one (libraries, duplicated assets).
    for i in 1..files.len() {
        if rng.below(5) == 0 {
            let j = usize_of(rng.below(i as u64));
            files[i].seed = files[j].seed;
        }
    }
    write_image(path, size, &files)?;
    println!("{}", path.display());
    Ok(())
}

fn sparse(path: &Path, size: u64, data_percent: u64, data_size: Option<u64>) -> Result<()> {
    if data_percent == 0 || data_percent > 100 {
        bail!("--data-percent must be 1..=100");
    }
    let blocks = size / BLOCK;
    let data_blocks = match data_size {
        Some(bytes) if bytes > size => bail!("--data-size is larger than --size"),
        Some(bytes) => bytes / BLOCK,
        None => blocks * data_percent / 100,
    };
    let mut rng = Rng(9);
    // Average file 128 blocks; the average gap (half the maximum drawn) spreads the data
    // over the whole image.
    let gap = 2 * 128 * (blocks - data_blocks) / data_blocks.max(1);
    let files = place_files(&mut rng, 0, blocks, data_blocks, 256, gap);
    write_image(path, size, &files)?;
    println!("{}", path.display());
    Ok(())
}

fn main() -> Result<()> {
    match Args::parse().kind {
        Kind::Family {
            dir,
            count,
            size,
            shuffle,
        } => family(&dir, count, size, shuffle),
        Kind::Dense { file, size } => dense(&file, size),
        Kind::Sparse {
            file,
            size,
            data_percent,
            data_size,
        } => sparse(&file, size, data_percent, data_size),
    }
}
