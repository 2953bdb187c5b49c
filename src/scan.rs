//! Scanning an image: find its data regions (skipping holes of sparse files), then hash every
//! non-zero 4 KiB block with blake3, in parallel across cores and, within a core, many blocks
//! at once across SIMD lanes ([`crate::hash`]). Pure of catalog concerns: the result is a
//! stream of batches of `(block, digest)` for the non-zero blocks, in block order.

use std::fs::File;
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::mpsc;

use nix::errno::Errno;
use nix::unistd::{Whence, lseek};
use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::hash;

mod mapped;

/// How a scan gets at the bytes it hashes. Measured on this project's 2-core test machine
/// (Linux 6.18, 2 GiB hot, `bench-scan`, same run): pread copies took 0.42-0.43 s of CPU,
/// a mapped window per chunk 0.53-0.58 s (populated at once or faulted in), and blake3 of
/// the whole file from one mapping (as `b3sum` does) 0.49-0.50 s: setting up and tearing
/// down the page table entries of every page costs more than copying it while it is in the
/// cache. So capture copies; the mapped windows stay for machines where that differs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Read {
    /// From a read-only mapping of each chunk, populated when it is made and unmapped once
    /// hashed, so at most one window per hashing thread is resident (falls back to
    /// `Copied` for a chunk that cannot be mapped).
    Mapped,
    /// pread(2) into a buffer per hashing thread.
    #[default]
    Copied,
}
use crate::image::{BLOCK_SIZE, ImageFile};
use crate::units::usize_of;

/// Content digest of one block (blake3 of the block's bytes; a partial last block is hashed
/// at its real length, so it only ever matches a partial block of the same length).
pub use crate::hash::Digest;

/// Blocks read and hashed by one parallel task when reading copies: small enough that the
/// copy read into the buffer is still in the core's L2 cache when it is hashed.
const CHUNK_BLOCKS: u64 = 64;
/// Blocks of one mapped window (1 MiB): large enough that mapping and unmapping cost little
/// per block, small enough that the windows of all hashing threads stay a few MiB of RSS.
const WINDOW_BLOCKS: u64 = 256;
/// Blocks handed to the consumer at once; one batch is hashed while the previous is stored.
const BATCH_BLOCKS: u64 = 16 * 1024;

/// Hashes one block.
pub fn hash_block(data: &[u8]) -> Digest {
    *blake3::hash(data).as_bytes()
}

/// True when every byte is zero. Checks 256-byte pieces so that data blocks, which almost
/// always differ early, stop early, while each piece still compiles to wide vector ORs.
pub fn is_zero(data: &[u8]) -> bool {
    data.chunks(256)
        .all(|piece| piece.iter().fold(0u8, |acc, &b| acc | b) == 0)
}

/// Block ranges of `file` (of `size` bytes) that may hold data, in order and disjoint. Holes
/// reported by SEEK_HOLE are left out; where the file system cannot tell, everything is data.
pub fn data_ranges(file: &File, size: u64, path: &Path) -> Result<Vec<Range<u64>>> {
    let blocks = size.div_ceil(BLOCK_SIZE);
    let fd = file.as_raw_fd();
    let mut ranges: Vec<Range<u64>> = Vec::new();
    let mut offset: u64 = 0;
    while offset < size {
        let data = match lseek(fd, offset as i64, Whence::SeekData) {
            Ok(pos) => pos as u64,
            // No data after `offset`: the rest is a hole.
            Err(Errno::ENXIO) => break,
            // File system (or device) without hole support: treat all as data.
            Err(Errno::EINVAL) | Err(Errno::EOPNOTSUPP) if ranges.is_empty() => {
                return Ok(std::iter::once(0..blocks)
                    .filter(|r| !r.is_empty())
                    .collect());
            }
            Err(e) => return Err(Error::io("cannot seek data in", path, e.into())),
        };
        if data >= size {
            break;
        }
        let hole = match lseek(fd, data as i64, Whence::SeekHole) {
            Ok(pos) => (pos as u64).min(size),
            Err(Errno::ENXIO) => size,
            Err(e) => return Err(Error::io("cannot seek hole in", path, e.into())),
        };
        let range = data / BLOCK_SIZE..hole.div_ceil(BLOCK_SIZE);
        match ranges.last_mut() {
            Some(last) if last.end >= range.start => last.end = last.end.max(range.end),
            _ => ranges.push(range),
        }
        offset = hole.max(data + 1);
    }
    Ok(ranges)
}

/// Non-zero blocks of one batch, in block order. Blocks of `blocks` not listed are zero.
#[derive(Debug, Default)]
pub struct Batch {
    /// First and end block of the chunks read; holes inside are not read.
    pub blocks: Range<u64>,
    /// Blocks and bytes really read.
    pub read_blocks: u64,
    pub read_bytes: u64,
    pub digests: Vec<(u64, Digest)>,
}

/// What a scan did, for reports and benchmarks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ScanStats {
    /// Blocks in the image.
    pub blocks: u64,
    /// Blocks inside holes, never read.
    pub hole_blocks: u64,
    /// Blocks read and found all zero (not hashed).
    pub zero_blocks: u64,
    /// Blocks hashed.
    pub hashed_blocks: u64,
    /// Bytes read from the image.
    pub bytes_read: u64,
}

/// Splits data ranges into batches of whole chunks, each chunk a range of at most
/// `chunk` blocks, each batch at most `BATCH_BLOCKS` blocks.
fn plan_batches(ranges: &[Range<u64>], chunk: u64) -> Vec<Vec<Range<u64>>> {
    let mut batches = Vec::new();
    let mut current: Vec<Range<u64>> = Vec::new();
    let mut in_batch = 0;
    for range in ranges {
        let mut start = range.start;
        while start < range.end {
            let end = (start + chunk).min(range.end);
            current.push(start..end);
            in_batch += end - start;
            start = end;
            if in_batch >= BATCH_BLOCKS {
                batches.push(std::mem::take(&mut current));
                in_batch = 0;
            }
        }
    }
    if !current.is_empty() {
        batches.push(current);
    }
    batches
}

/// Digests of the non-zero blocks of `data`, whose first block is block `first` of the image.
/// Whole blocks are hashed many at a time across SIMD lanes ([`hash::hash_blocks`]); a
/// partial last block is hashed at its length.
fn hash_nonzero(data: &[u8], first: u64) -> Vec<(u64, Digest)> {
    let mut indices = Vec::with_capacity(usize_of(CHUNK_BLOCKS));
    let mut blocks: Vec<&[u8; hash::BLOCK]> = Vec::with_capacity(usize_of(CHUNK_BLOCKS));
    let mut partial = None;
    for (block, index) in data.chunks(usize_of(BLOCK_SIZE)).zip(first..) {
        if is_zero(block) {
            continue;
        }
        match block.try_into() {
            Ok(whole) => {
                indices.push(index);
                blocks.push(whole);
            }
            Err(_) => partial = Some((index, hash_block(block))),
        }
    }
    let mut digests = vec![[0u8; 32]; blocks.len()];
    hash::hash_blocks(&blocks, &mut digests);
    let mut out: Vec<(u64, Digest)> = indices.into_iter().zip(digests).collect();
    out.extend(partial);
    out
}

/// The error of a read that found the file shorter than it was.
fn shorter(path: &Path) -> Error {
    Error::ChangedDuringCapture {
        path: path.to_path_buf(),
        what: "it became shorter".into(),
    }
}

/// Reads `data.len()` bytes of `file` at `offset` into `data` with pread.
fn read_at(file: &File, path: &Path, data: &mut [u8], offset: u64) -> Result<()> {
    file.read_exact_at(data, offset).map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            shorter(path)
        } else {
            Error::io("cannot read", path, e)
        }
    })
}

/// Reads and hashes the chunks of one batch in parallel: each chunk from a mapping of its
/// own when `read` says so (unmapped as soon as it is hashed, so resident pages stay bounded
/// by one window per thread), else, or where it cannot be mapped, with pread into a buffer
/// per thread.
fn hash_batch(
    file: &File,
    size: u64,
    path: &Path,
    chunks: &[Range<u64>],
    read: Read,
) -> Result<Batch> {
    let bounds =
        |chunk: &Range<u64>| (chunk.start * BLOCK_SIZE, (chunk.end * BLOCK_SIZE).min(size));
    let per_chunk: Vec<Vec<(u64, Digest)>> = chunks
        .par_iter()
        .map_init(Vec::new, |buf, chunk| {
            let (start, end) = bounds(chunk);
            let len = usize_of(end - start);
            if read == Read::Mapped
                && let Some(map) = mapped::Mapped::new(file, start, len)
            {
                let digests = hash_nonzero(map.bytes(), chunk.start);
                if map.faulted() {
                    return Err(shorter(path));
                }
                return Ok(digests);
            }
            buf.resize(len, 0);
            let data = &mut buf[..len];
            read_at(file, path, data, start)?;
            Ok(hash_nonzero(data, chunk.start))
        })
        .collect::<Result<_>>()?;
    let digests = per_chunk.into_iter().flatten().collect();
    let blocks = match (chunks.first(), chunks.last()) {
        (Some(first), Some(last)) => first.start..last.end,
        _ => 0..0,
    };
    let read_blocks = chunks.iter().map(|c| c.end - c.start).sum();
    let read_bytes = chunks
        .iter()
        .map(|c| {
            let (start, end) = bounds(c);
            end - start
        })
        .sum();
    Ok(Batch {
        blocks,
        read_blocks,
        read_bytes,
        digests,
    })
}

/// A scan of one image: its data ranges are found up front so that progress can be reported
/// against the bytes that will really be read.
pub struct Scan<'a> {
    file: &'a File,
    size: u64,
    path: &'a Path,
    ranges: Vec<Range<u64>>,
    read: Read,
}

impl<'a> Scan<'a> {
    pub fn new(file: &'a File, size: u64, path: &'a Path) -> Result<Scan<'a>> {
        let ranges = data_ranges(file, size, path)?;
        Ok(Scan {
            file,
            size,
            path,
            ranges,
            read: Read::default(),
        })
    }

    /// Chooses how blocks are read (for benchmarks and tests; the default copies).
    pub fn read(mut self, read: Read) -> Scan<'a> {
        self.read = read;
        self
    }

    /// Bytes inside data ranges: what the scan will read.
    pub fn data_bytes(&self) -> u64 {
        self.ranges
            .iter()
            .map(|r| (r.end * BLOCK_SIZE).min(self.size) - r.start * BLOCK_SIZE)
            .sum()
    }

    /// Hashes the non-zero blocks and hands them to `consume` batch by batch, in block order.
    /// The next batch is hashed while `consume` stores the previous one, so storing does not
    /// stall hashing. Memory stays bounded by two batches of digests.
    pub fn run(self, mut consume: impl FnMut(Batch) -> Result<()>) -> Result<ScanStats> {
        let Scan {
            file,
            size,
            path,
            ranges,
            read,
        } = self;
        let blocks = size.div_ceil(BLOCK_SIZE);
        let data_blocks: u64 = ranges.iter().map(|r| r.end - r.start).sum();
        let chunk = match read {
            Read::Mapped => WINDOW_BLOCKS,
            Read::Copied => CHUNK_BLOCKS,
        };
        let batches = plan_batches(&ranges, chunk);
        let mut stats = ScanStats {
            blocks,
            hole_blocks: blocks - data_blocks,
            ..ScanStats::default()
        };
        std::thread::scope(|scope| {
            let (tx, rx) = mpsc::sync_channel::<Result<Batch>>(1);
            let producer = scope.spawn(move || {
                for chunks in &batches {
                    let batch = hash_batch(file, size, path, chunks, read);
                    let failed = batch.is_err();
                    if tx.send(batch).is_err() || failed {
                        break;
                    }
                }
            });
            let mut result = Ok(());
            for batch in rx.iter() {
                let step = batch.and_then(|batch| {
                    let hashed = batch.digests.len() as u64;
                    stats.hashed_blocks += hashed;
                    stats.zero_blocks += batch.read_blocks - hashed;
                    stats.bytes_read += batch.read_bytes;
                    consume(batch)
                });
                if let Err(e) = step {
                    result = Err(e);
                    break;
                }
            }
            // Dropping the receiver makes a producer blocked in `send` stop.
            drop(rx);
            if producer.join().is_err() {
                result = Err(Error::internal("hashing thread panicked"));
            }
            result
        })?;
        Ok(stats)
    }
}

/// Scans a whole image in one call; see [`Scan::run`].
pub fn scan(
    file: &File,
    size: u64,
    path: &Path,
    consume: impl FnMut(Batch) -> Result<()>,
) -> Result<ScanStats> {
    Scan::new(file, size, path)?.run(consume)
}

/// A non-zero block and the digest of its content.
pub type BlockDigest = (u64, Digest);

/// Reads and hashes a whole image, reporting progress (bytes done, of total) and stopping
/// when vmard shuts down or the request's client went away; hands the digests of its non-zero blocks, in block order, to
/// `digests` a batch at a time (it keeps or spills them: nothing here grows with the image).
pub fn hash_image(
    image: &ImageFile,
    progress: &mut dyn FnMut(u64, u64),
    digests: &mut dyn FnMut(&[BlockDigest]) -> Result<()>,
) -> Result<ScanStats> {
    let scan = Scan::new(&image.file, image.size, &image.path)?;
    let total = scan.data_bytes();
    let mut done = 0;
    progress(done, total);
    let stats = scan.run(|batch| {
        if crate::shutdown::requested() {
            return Err(Error::ShuttingDown);
        }
        crate::fault::point(crate::fault::Step::CaptureBatch)?;
        digests(&batch.digests)?;
        done += batch.read_bytes;
        progress(done, total);
        // Progress is where a connection finds its client gone.
        if crate::shutdown::cancelled() {
            return Err(Error::Cancelled);
        }
        Ok(())
    })?;
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Seek, SeekFrom, Write};

    fn sparse_file(layout: &[(u64, &[u8])], size: u64) -> (tempfile::TempDir, File) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        let mut file = File::create(&path).unwrap();
        for (offset, data) in layout {
            file.seek(SeekFrom::Start(*offset)).unwrap();
            file.write_all(data).unwrap();
        }
        file.set_len(size).unwrap();
        (dir, File::open(path).unwrap())
    }

    #[test]
    fn zero_detection() {
        assert!(is_zero(&[0u8; 4096]));
        assert!(is_zero(&[]));
        for pos in [0, 255, 256, 4095] {
            let mut block = [0u8; 4096];
            block[pos] = 1;
            assert!(!is_zero(&block), "{pos}");
        }
    }

    #[test]
    fn digests_depend_on_content_and_length() {
        let a = [1u8; 4096];
        let mut b = a;
        b[4000] = 2;
        assert_ne!(hash_block(&a), hash_block(&b));
        assert_eq!(hash_block(&a), hash_block(&[1u8; 4096]));
        assert_ne!(hash_block(&a[..512]), hash_block(&a));
        assert_eq!(hash_block(&a), *blake3::hash(&a).as_bytes());
    }

    #[test]
    fn holes_are_skipped() {
        let mib = 1 << 20;
        let (_dir, file) =
            sparse_file(&[(mib, &[1u8; 4096]), (5 * mib + 100, &[2u8; 10])], 8 * mib);
        let ranges = data_ranges(&file, 8 * mib, Path::new("img")).unwrap();
        // Every range is inside the file, they are sorted and disjoint, and both writes are
        // covered; the holes between them are not (file systems allocate at least 4 KiB).
        assert!(ranges.windows(2).all(|w| w[0].end < w[1].start));
        let covered = |block: u64| ranges.iter().any(|r| r.contains(&block));
        assert!(covered(mib / BLOCK_SIZE));
        assert!(covered((5 * mib + 100) / BLOCK_SIZE));
        let data: u64 = ranges.iter().map(|r| r.end - r.start).sum();
        assert!(data < (8 * mib / BLOCK_SIZE) / 2, "{ranges:?}");
    }

    #[test]
    fn scan_finds_exactly_the_nonzero_blocks() {
        let mib = 1 << 20;
        let size = 4 * mib + 1024; // partial last block
        let mut dense = vec![0u8; 64 * 4096];
        dense[3 * 4096] = 9; // block 3 of the dense part is non-zero, the others zero
        let (_dir, file) = sparse_file(
            &[
                (0, &dense),
                (2 * mib, &[5u8; 4096]),
                (4 * mib, &[6u8; 1024]),
            ],
            size,
        );
        let mut seen = Vec::new();
        let stats = scan(&file, size, Path::new("img"), |batch| {
            seen.extend(batch.digests);
            Ok(())
        })
        .unwrap();
        let blocks: Vec<u64> = seen.iter().map(|(b, _)| *b).collect();
        assert_eq!(blocks, vec![3, 2 * mib / 4096, 4 * mib / 4096]);
        assert_eq!(seen[2].1, hash_block(&[6u8; 1024]));
        assert_eq!(stats.blocks, 4 * mib / 4096 + 1);
        assert_eq!(stats.hashed_blocks, 3);
        assert_eq!(
            stats.blocks,
            stats.hole_blocks + stats.zero_blocks + stats.hashed_blocks
        );
        assert!(stats.hole_blocks > 0);
    }

    #[test]
    fn digests_are_blake3_of_each_nonzero_block() {
        // 300 blocks and a partial one; every third block zero, so lane groups are made of
        // non-contiguous blocks and leave remainders of every size.
        let size = 300 * BLOCK_SIZE + 100;
        let mut content = vec![0u8; usize_of(size)];
        let mut x = 0x2545F4914F6CDD1Du64;
        for (i, block) in content.chunks_mut(usize_of(BLOCK_SIZE)).enumerate() {
            if i % 3 == 1 {
                continue;
            }
            for byte in block.iter_mut() {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *byte = x.to_le_bytes()[0];
            }
        }
        let (_dir, file) = sparse_file(&[(0, &content)], size);
        let expected: Vec<(u64, Digest)> = content
            .chunks(usize_of(BLOCK_SIZE))
            .zip(0u64..)
            .filter(|(block, _)| !is_zero(block))
            .map(|(block, i)| (i, *blake3::hash(block).as_bytes()))
            .collect();
        assert_eq!(expected.len(), 201);
        for read in [Read::Mapped, Read::Copied] {
            let mut seen = Vec::new();
            Scan::new(&file, size, Path::new("img"))
                .unwrap()
                .read(read)
                .run(|batch| {
                    seen.extend(batch.digests);
                    Ok(())
                })
                .unwrap();
            assert_eq!(seen, expected, "{read:?}");
        }
    }

    #[test]
    fn an_image_truncated_during_the_scan_is_reported() {
        let size = 2 * BATCH_BLOCKS * BLOCK_SIZE;
        for read in [Read::Mapped, Read::Copied] {
            let (dir, file) = sparse_file(&[(0, &vec![3u8; usize_of(size)])], size);
            let scan = Scan::new(&file, size, Path::new("img")).unwrap().read(read);
            File::options()
                .write(true)
                .open(dir.path().join("img"))
                .unwrap()
                .set_len(size / 2 + 100)
                .unwrap();
            let err = scan.run(|_| Ok(())).unwrap_err();
            assert_eq!(err.kind(), "changed-during-capture", "{read:?}");
        }
    }

    /// Resident KiB of this process's mappings of `path` (from /proc/self/smaps).
    fn resident_kib(path: &Path) -> u64 {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let name = path.to_string_lossy();
        let (mut ours, mut kib) = (false, 0);
        for line in smaps.lines() {
            if let Some(rss) = line.strip_prefix("Rss:") {
                if ours {
                    kib += rss.trim().trim_end_matches(" kB").parse::<u64>().unwrap();
                }
            } else if !line.starts_with(char::is_uppercase) {
                ours = line.ends_with(name.as_ref());
            }
        }
        kib
    }

    #[test]
    fn mapped_windows_keep_resident_pages_bounded() {
        let size = 4 * BATCH_BLOCKS * BLOCK_SIZE; // 256 MiB of data in 4 batches
        let (dir, file) = sparse_file(&[(0, &vec![5u8; usize_of(size)])], size);
        let path = dir.path().join("img");
        // The measure sees a window while it is mapped (populated), and none after.
        let window = mapped::Mapped::new(&file, 0, 1 << 20).unwrap();
        assert!(resident_kib(&path) >= 1024, "{}", resident_kib(&path));
        drop(window);
        assert_eq!(resident_kib(&path), 0);
        let mut peak = 0;
        let mut hashed = 0;
        Scan::new(&file, size, &path)
            .unwrap()
            .read(Read::Mapped)
            .run(|batch| {
                hashed += batch.digests.len();
                peak = peak.max(resident_kib(&path));
                Ok(())
            })
            .unwrap();
        assert_eq!(hashed as u64, size / BLOCK_SIZE);
        // Windows of 1 MiB, one per hashing thread at most, never a batch (64 MiB).
        let bound = 1024 * (rayon::current_num_threads() as u64 + 1);
        assert!(peak <= bound, "{peak} KiB resident, bound {bound} KiB");
        assert_eq!(resident_kib(&path), 0, "a window was left mapped");
    }

    #[test]
    fn batches_cover_ranges_in_order() {
        let ranges = vec![0..10, 20..(20 + 3 * BATCH_BLOCKS)];
        let batches = plan_batches(&ranges, CHUNK_BLOCKS);
        let chunks: Vec<Range<u64>> = batches.iter().flatten().cloned().collect();
        assert!(chunks.iter().all(|c| c.end - c.start <= CHUNK_BLOCKS));
        assert!(chunks.windows(2).all(|w| w[0].end <= w[1].start));
        let total: u64 = chunks.iter().map(|c| c.end - c.start).sum();
        assert_eq!(total, 10 + 3 * BATCH_BLOCKS);
        assert!(batches.len() >= 3);
    }

    #[test]
    fn consumer_errors_stop_the_scan() {
        let size = 3 * BATCH_BLOCKS * BLOCK_SIZE;
        let (_dir, file) = sparse_file(&[(0, &vec![1u8; usize_of(size)])], size);
        let mut calls = 0;
        let err = scan(&file, size, Path::new("img"), |_| {
            calls += 1;
            Err(Error::Protocol("stop".into()))
        })
        .unwrap_err();
        assert_eq!(err.kind(), "protocol");
        assert_eq!(calls, 1);
    }
}
