//! Block-device images: what their identity cannot tell. A device node's times say nothing
//! about its content (see [`crate::image::ImageIdentity`]), so a write to a block device
//! that vmar serves is found two other ways:
//!
//! - its write counters (`/sys/dev/block/M:m/stat`: sectors written and discarded), which
//!   count every write to that device whatever node, file system or stacked device issued
//!   it; exact, but only since boot, and blind to writes below the device (to the disk under
//!   a partition or an LV);
//! - sampled digests: blocks chosen at random across the image are read (`O_DIRECT`, so the
//!   medium, not a stale cache, answers) and compared with the catalog's digests. This
//!   works across reboots and below the device, but only finds a change a sample lands in:
//!   with `n` samples and a change of fraction `f` of the image, it is missed with
//!   probability `(1 - f)^n`.

use std::fs::File;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

use crate::catalog::{Catalog, ImageRecord};
use crate::error::{Error, Result};
use crate::image::{BLOCK_SIZE, DeviceNumber};
use crate::scan::{Digest, hash_block, is_zero};
use crate::units::usize_of;

/// Blocks chosen at random across an image, with what the catalog says they hold.
#[derive(Clone, Debug)]
pub struct Samples {
    /// Sorted, distinct block numbers.
    pub blocks: Vec<u64>,
    /// The catalog's digest of each, `None` for a block captured as all zeros.
    pub digests: Vec<Option<Digest>>,
    /// Where the next round-robin check starts.
    next: usize,
}

/// `n` distinct blocks of an image of `blocks` blocks, block 0 (partition tables, file
/// system superblocks) always among them, the rest spread by `seed`. Pure.
pub fn choose(blocks: u64, n: usize, seed: &[u8]) -> Vec<u64> {
    let mut chosen = std::collections::BTreeSet::new();
    if blocks == 0 || n == 0 {
        return Vec::new();
    }
    chosen.insert(0);
    let want = n.min(usize::try_from(blocks).unwrap_or(usize::MAX));
    let mut xof = blake3::Hasher::new_derive_key("vmar 2026 block samples v1")
        .update(seed)
        .finalize_xof();
    let mut word = [0u8; 8];
    // Bounded: enough draws to fill even a tiny image with high probability.
    for _ in 0..want.saturating_mul(16) {
        if chosen.len() >= want {
            break;
        }
        xof.fill(&mut word);
        chosen.insert(u64::from_le_bytes(word) % blocks);
    }
    chosen.into_iter().collect()
}

/// Chooses `n` samples of `image` and reads their digests from the catalog.
pub fn load(catalog: &Catalog, image: &ImageRecord, n: usize) -> Result<Samples> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let mut seed = image.name.as_bytes().to_vec();
    seed.extend_from_slice(&now.to_le_bytes());
    let blocks = choose(image.size.div_ceil(BLOCK_SIZE), n, &seed);
    let digests = catalog.sample_digests(image.id, &blocks)?;
    Ok(Samples {
        blocks,
        digests,
        next: 0,
    })
}

/// Opens block device `path` for sampling: read-only and `O_DIRECT`.
pub fn open_direct(path: &Path) -> Result<File> {
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_DIRECT | nix::libc::O_NOCTTY)
        .open(path)
        .map_err(|e| Error::io("cannot open for sampling", path, e))
}

impl Samples {
    /// Reads the next `count` samples (round robin; all of them if `count` is 0) from
    /// `file`, an image of `size` bytes, and compares them with the catalog. `Some(what)`
    /// when one differs.
    pub fn check(
        &mut self,
        file: &File,
        path: &Path,
        size: u64,
        count: usize,
    ) -> Result<Option<String>> {
        let total = self.blocks.len();
        if total == 0 {
            return Ok(None);
        }
        let count = if count == 0 { total } else { count.min(total) };
        // O_DIRECT wants an aligned buffer: an anonymous map is page-aligned.
        let mut buffer = memmap2::MmapMut::map_anon(usize_of(BLOCK_SIZE))
            .map_err(|e| Error::io("cannot map a sample buffer for", path, e))?;
        for _ in 0..count {
            let i = self.next % total;
            self.next = (i + 1) % total;
            let block = self.blocks[i];
            let at = block * BLOCK_SIZE;
            let len = usize_of(BLOCK_SIZE.min(size.saturating_sub(at)));
            let n = file
                .read_at(&mut buffer[..], at)
                .map_err(|e| Error::io("cannot read a sample of", path, e))?;
            let data = &buffer[..n.min(len)];
            let same = match &self.digests[i] {
                None => is_zero(data),
                Some(digest) => data.len() == len && hash_block(data) == *digest,
            };
            if !same {
                return Ok(Some(format!(
                    "block {block} differs from the catalog (sampled; written in place)"
                )));
            }
        }
        Ok(None)
    }
}

/// Sectors written and discarded on block device `device` since boot, from sysfs.
pub fn writes(device: DeviceNumber) -> Option<u64> {
    let (major, minor) = device;
    let text = std::fs::read_to_string(format!("/sys/dev/block/{major}:{minor}/stat")).ok()?;
    parse_stat_writes(&text)
}

/// Sectors written plus sectors discarded from the text of a block device's `stat` file
/// (fields 7 and 14; kernels before 4.18 have no discard fields). Pure.
pub fn parse_stat_writes(text: &str) -> Option<u64> {
    let fields: Vec<u64> = text
        .split_whitespace()
        .map(str::parse)
        .collect::<std::result::Result<_, _>>()
        .ok()?;
    let written = *fields.get(6)?;
    let discarded = fields.get(13).copied().unwrap_or(0);
    Some(written + discarded)
}

/// Blocks sampled from a block-device image before vmar serves it (create, refresh,
/// restore), and the pool the periodic checks go round.
pub const PLAN_SAMPLES: usize = 1024;

/// Checks a block-device image before vmar serves it: its sampled blocks must match the
/// catalog (identity cannot tell). Fails with `image-changed`.
pub fn check_block_image(catalog: &Catalog, image: &ImageRecord) -> Result<()> {
    if !image.identity.is_block_device() {
        return Ok(());
    }
    let file = open_direct(&image.path)?;
    let mut pool = load(catalog, image, PLAN_SAMPLES)?;
    match pool.check(&file, &image.path, image.size, 0)? {
        None => Ok(()),
        Some(what) => Err(Error::ImageChanged {
            name: image.name.clone(),
            path: image.path.clone(),
            what,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_are_distinct_sorted_bounded_and_include_block_zero() {
        let s = choose(1000, 64, b"seed");
        assert_eq!(s.len(), 64);
        assert_eq!(s[0], 0);
        assert!(s.windows(2).all(|w| w[0] < w[1]));
        assert!(s.iter().all(|b| *b < 1000));
        assert_ne!(s, choose(1000, 64, b"other seed"));
        assert_eq!(s, choose(1000, 64, b"seed"));
        // Spread: both halves of the image are sampled.
        assert!(s.iter().any(|b| *b > 500) && s.iter().any(|b| (1..500).contains(b)));
        assert_eq!(choose(3, 64, b"seed"), vec![0, 1, 2]);
        assert!(choose(0, 64, b"seed").is_empty());
    }

    #[test]
    fn write_counters_are_read_from_sysfs_stat() {
        // 6.1's 17 fields: writes of 24 sectors, discards of 8.
        let stat = "  100 0 800 10   3 0 24 5   0 20 30   1 0 8 0   0 0\n";
        assert_eq!(parse_stat_writes(stat), Some(32));
        // Before discard fields.
        assert_eq!(parse_stat_writes("1 0 8 1 2 0 16 1 0 1 1"), Some(16));
        assert_eq!(parse_stat_writes("garbage"), None);
        assert_eq!(parse_stat_writes("1 2 3"), None);
    }

    #[test]
    fn a_changed_sample_is_found_and_an_unchanged_one_passes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        let mut data = vec![0u8; 4 * 4096];
        data[4096..8192].fill(7);
        data[3 * 4096..].fill(9);
        std::fs::write(&path, &data).unwrap();
        let digest = |b: usize| hash_block(&data[b * 4096..(b + 1) * 4096]);
        let mut samples = Samples {
            blocks: vec![0, 1, 2, 3],
            digests: vec![None, Some(digest(1)), None, Some(digest(3))],
            next: 0,
        };
        let file = File::open(&path).unwrap();
        assert_eq!(samples.check(&file, &path, 4 * 4096, 0).unwrap(), None);
        // A zero block written, then a data block changed.
        std::fs::write(&path, {
            let mut d = data.clone();
            d[2 * 4096] = 1;
            d
        })
        .unwrap();
        let file = File::open(&path).unwrap();
        let what = samples.check(&file, &path, 4 * 4096, 0).unwrap();
        assert!(what.is_some_and(|w| w.contains("block 2")));
        // Round robin: two at a time cover all four.
        std::fs::write(&path, &data).unwrap();
        let file = File::open(&path).unwrap();
        assert_eq!(samples.check(&file, &path, 4 * 4096, 2).unwrap(), None);
        assert_eq!(samples.check(&file, &path, 4 * 4096, 2).unwrap(), None);
    }
}
