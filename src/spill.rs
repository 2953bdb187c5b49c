//! A capture's per-block records, kept in memory up to a fixed number and spilled to
//! temporary files beyond it, so capturing an image needs the same memory whatever its size.
//!
//! Hashing yields `(block, digest)` in block order. Resolution needs them in digest order
//! (sorted runs, merged); the map and the stored digests need them in block order again:
//! that is the image's digest list, written as the records come to the file it is kept in
//! ([`crate::digests`]), never held in memory. Resolution yields redirects in digest order;
//! the map needs them in block order (a second external sort). Each sort holds at most
//! [`Spill::records`] records in memory at a time; only an image with more non-zero blocks
//! than that writes temporary files, in a private directory under the state directory that
//! is removed when the capture ends (and on the next start after a crash).
//!
//! The external sort is our own, small and for fixed-size records: the `extsort` crate
//! (0.5.0) returns no records at all when their number is a multiple of its segment size
//! (measured: 30 records in segments of 10 came back as 0).

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use rayon::iter::{IntoParallelRefMutIterator, ParallelIterator};
use rayon::slice::ParallelSliceMut;

pub use crate::digests::BlockDigests;
use crate::error::{Error, Result};
use crate::map::{ImageId, Source};
use crate::scan::Digest;

/// Records of each kind a capture keeps in memory before spilling: about 40 MiB of digests
/// (40 bytes each) and 20 MiB of redirects (one less than a power of two, so the buffer's
/// capacity never doubles). The block-ordered list is never in memory, so this is the same
/// bound as two kinds of half as many records: a 4 GiB dense image is sorted in memory.
pub const DEFAULT_RECORDS: usize = (1 << 20) - 1;

/// Name of the directory under the state directory that holds spilled records.
pub const SPILL_DIR: &str = "spill";

/// A content and the block where this image holds it; ordered by digest, then block, so the
/// first copy in the image comes first among equal contents.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByDigest {
    pub digest: Digest,
    pub block: u64,
}

/// A fixed-size record the external sort can write and read back.
pub trait Record: Copy + Ord + Send {
    const SIZE: usize;
    fn encode(&self, out: &mut [u8]);
    fn decode(bytes: &[u8]) -> Self;

    /// Buckets a [`Sorter`] keeps records in as they are pushed, by [`Record::bucket`]:
    /// every record of a bucket sorts before every record of the next, so sorting is
    /// sorting each bucket, all of them at once on all cores.
    const BUCKETS: usize = 1;

    /// The bucket of this record (below [`Record::BUCKETS`]).
    fn bucket(&self) -> usize {
        0
    }

    /// Sorts records in their order (one bucket's, or any).
    fn sort(records: &mut [Self]) {
        records.par_sort_unstable();
    }
}

impl Record for ByDigest {
    const SIZE: usize = 40;

    fn encode(&self, out: &mut [u8]) {
        out[..32].copy_from_slice(&self.digest);
        out[32..40].copy_from_slice(&self.block.to_le_bytes());
    }

    fn decode(bytes: &[u8]) -> Self {
        let (block, digest) = decode_block_digest(bytes);
        ByDigest { digest, block }
    }

    /// Digests are uniform: their first byte spreads records evenly over 256 buckets,
    /// small enough for the CPU's caches, sorted in parallel.
    const BUCKETS: usize = 256;

    fn bucket(&self) -> usize {
        usize::from(self.digest[0])
    }

    /// In the derived order: the records are dealt out by the digests' bytes, one byte a
    /// pass (a counting sort through a scratch copy), until the groups left (about 8
    /// records for a bucket of 2,048) are sorted by insertion. A pass over records that
    /// all share their byte moves nothing. 524,288 records of a 2 GiB image took 18 ms of
    /// CPU by comparison sort here; see docs/benchmarks.md (sidecar import) for this one.
    fn sort(records: &mut [Self]) {
        SCRATCH.with_borrow_mut(|scratch| radix_sort(records, 0, scratch));
    }
}

thread_local! {
    /// The scratch copy of [`radix_sort`]: one per thread, kept, so sorting allocates once.
    static SCRATCH: std::cell::RefCell<Vec<ByDigest>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

/// Groups of at most this many records are sorted by insertion.
const INSERTION_MAX: usize = 24;

/// Sorts `records`, which share their digests' bytes before `at`: dealt out by byte `at`,
/// then each group on its own from the next byte (by comparison from the 8th on).
fn radix_sort(records: &mut [ByDigest], at: usize, scratch: &mut Vec<ByDigest>) {
    if records.len() <= INSERTION_MAX {
        insertion_sort(records);
        return;
    }
    if at >= 8 {
        records.sort_unstable_by(digest_order);
        return;
    }
    let mut counts = [0usize; 256];
    for record in records.iter() {
        counts[usize::from(record.digest[at])] += 1;
    }
    if !counts.contains(&records.len()) {
        let mut next = [0usize; 256];
        let mut start = 0;
        for byte in 0..256 {
            next[byte] = start;
            start += counts[byte];
        }
        scratch.clear();
        scratch.extend_from_slice(records);
        for record in scratch.iter() {
            let byte = usize::from(record.digest[at]);
            records[next[byte]] = *record;
            next[byte] += 1;
        }
    }
    let mut rest = records;
    for count in counts {
        let (group, tail) = rest.split_at_mut(count);
        if count > 1 {
            radix_sort(group, at + 1, scratch);
        }
        rest = tail;
    }
}

/// The order of [`ByDigest`] (digest, then block), most comparisons settled on the
/// digests' first 8 bytes as one integer instead of a byte-wise compare of 32 (digests are
/// uniform: equal prefixes are duplicates, or one pair in 2^64).
fn digest_order(a: &ByDigest, b: &ByDigest) -> std::cmp::Ordering {
    let prefix = |r: &ByDigest| {
        let mut head = [0u8; 8];
        head.copy_from_slice(&r.digest[..8]);
        u64::from_be_bytes(head)
    };
    prefix(a).cmp(&prefix(b)).then_with(|| a.cmp(b))
}

/// Sorts a few records.
fn insertion_sort(records: &mut [ByDigest]) {
    for i in 1..records.len() {
        let mut j = i;
        while j > 0 && digest_order(&records[j - 1], &records[j]).is_gt() {
            records.swap(j - 1, j);
            j -= 1;
        }
    }
}

/// A block served from another block (of this or an earlier image), ordered by block.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Redirect {
    pub block: u64,
    pub image: ImageId,
    pub target: u64,
}

impl Redirect {
    pub fn source(&self) -> Source {
        Source::Redirect {
            image: self.image,
            block: self.target,
        }
    }
}

impl Record for Redirect {
    const SIZE: usize = 20;

    fn encode(&self, out: &mut [u8]) {
        out[..8].copy_from_slice(&self.block.to_le_bytes());
        out[8..12].copy_from_slice(&self.image.to_le_bytes());
        out[12..20].copy_from_slice(&self.target.to_le_bytes());
    }

    fn decode(bytes: &[u8]) -> Self {
        let mut block = [0u8; 8];
        block.copy_from_slice(&bytes[..8]);
        let mut image = [0u8; 4];
        image.copy_from_slice(&bytes[8..12]);
        let mut target = [0u8; 8];
        target.copy_from_slice(&bytes[12..20]);
        Redirect {
            block: u64::from_le_bytes(block),
            image: u32::from_le_bytes(image),
            target: u64::from_le_bytes(target),
        }
    }
}

/// Digest-ordered records of an image, read back from memory or merged from spilled runs.
pub type SortedDigests = Sorted<ByDigest>;
/// Block-ordered redirects, read back from memory or merged from spilled runs.
pub type SortedRedirects = Sorted<Redirect>;

fn decode_block_digest(record: &[u8]) -> (u64, Digest) {
    let mut digest = [0u8; 32];
    digest.copy_from_slice(&record[..32]);
    let mut block = [0u8; 8];
    block.copy_from_slice(&record[32..40]);
    (u64::from_le_bytes(block), digest)
}

/// Sorts records pushed in any order, in memory up to `limit` records, beyond that as
/// sorted runs in files of `dir` that [`Sorter::finish`] merges. Records are kept in their
/// [`Record::bucket`] as they come, so that sorting them is sorting each bucket.
pub struct Sorter<T: Record> {
    dir: PathBuf,
    limit: usize,
    buckets: Vec<Vec<T>>,
    /// Records in the buckets.
    len: usize,
    runs: Vec<File>,
}

impl<T: Record> Sorter<T> {
    fn new(dir: PathBuf, limit: usize) -> Sorter<T> {
        Sorter {
            dir,
            limit,
            buckets: (0..T::BUCKETS).map(|_| Vec::new()).collect(),
            len: 0,
            runs: Vec::new(),
        }
    }

    /// Makes room for `records` records (at most the limit), spread over the buckets with
    /// some margin, so that the buckets do not grow (and copy themselves) one by one.
    pub fn reserve(&mut self, records: u64) {
        let records = usize::try_from(records)
            .unwrap_or(usize::MAX)
            .min(self.limit);
        let each = if T::BUCKETS == 1 {
            records
        } else {
            let mean = records / T::BUCKETS;
            mean + mean / 8 + 16
        };
        for bucket in &mut self.buckets {
            bucket.reserve(each);
        }
    }

    pub fn push(&mut self, record: T) -> Result<()> {
        self.buckets[record.bucket()].push(record);
        self.len += 1;
        if self.len >= self.limit {
            self.spill_run()?;
        }
        Ok(())
    }

    /// Sorts every bucket, in parallel.
    fn sort_buckets(&mut self) {
        self.buckets
            .par_iter_mut()
            .for_each(|bucket| T::sort(bucket));
    }

    fn spill_run(&mut self) -> Result<()> {
        self.sort_buckets();
        let path = &self.dir;
        let file = unnamed_file(path)?;
        let mut out = BufWriter::with_capacity(1 << 20, file);
        let mut bytes = vec![0u8; T::SIZE];
        for bucket in &mut self.buckets {
            for record in bucket.drain(..) {
                record.encode(&mut bytes);
                out.write_all(&bytes).map_err(|e| spill_error(path, e))?;
            }
        }
        self.len = 0;
        let mut file = out
            .into_inner()
            .map_err(|e| spill_error(path, e.into_error()))?;
        file.seek(SeekFrom::Start(0))
            .map_err(|e| spill_error(path, e))?;
        self.runs.push(file);
        Ok(())
    }

    /// All records pushed, in order.
    pub fn finish(mut self) -> Result<Sorted<T>> {
        if self.runs.is_empty() {
            self.sort_buckets();
            return Ok(Sorted::Memory(
                std::mem::take(&mut self.buckets).into_iter().flatten(),
            ));
        }
        if self.len > 0 {
            self.spill_run()?;
        }
        self.buckets = Vec::new();
        let mut merge = Merge {
            dir: self.dir.clone(),
            readers: Vec::new(),
            heap: BinaryHeap::new(),
        };
        for file in std::mem::take(&mut self.runs) {
            merge.readers.push(BufReader::with_capacity(64 << 10, file));
            let run = merge.readers.len() - 1;
            if let Some(record) = merge.read(run)? {
                merge.heap.push(Reverse((record, run)));
            }
        }
        Ok(Sorted::Merge(merge))
    }
}

/// Sorted records: from memory (the buckets, in order), or merged from runs on disk.
pub enum Sorted<T: Record> {
    Memory(std::iter::Flatten<std::vec::IntoIter<Vec<T>>>),
    Merge(Merge<T>),
}

/// A k-way merge of sorted runs: a heap holds the next record of each run.
pub struct Merge<T: Record> {
    dir: PathBuf,
    readers: Vec<BufReader<File>>,
    heap: BinaryHeap<Reverse<(T, usize)>>,
}

impl<T: Record> Merge<T> {
    fn read(&mut self, run: usize) -> Result<Option<T>> {
        let mut bytes = [0u8; 64];
        let bytes = &mut bytes[..T::SIZE];
        match self.readers[run].read_exact(bytes) {
            Ok(()) => Ok(Some(T::decode(bytes))),
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(None),
            Err(e) => Err(spill_error(&self.dir, e)),
        }
    }
}

impl<T: Record> Iterator for Sorted<T> {
    type Item = Result<T>;

    fn next(&mut self) -> Option<Result<T>> {
        match self {
            Sorted::Memory(records) => records.next().map(Ok),
            Sorted::Merge(merge) => {
                let Reverse((record, run)) = merge.heap.pop()?;
                match merge.read(run) {
                    Ok(Some(next)) => merge.heap.push(Reverse((next, run))),
                    Ok(None) => {}
                    Err(e) => return Some(Err(e)),
                }
                Some(Ok(record))
            }
        }
    }
}

/// Where one capture spills: a private directory removed when the capture ends.
pub struct Spill {
    dir: tempfile::TempDir,
    records: usize,
}

impl Spill {
    /// A spill area under `parent` (created if needed) that keeps `records` records of each
    /// kind in memory.
    pub fn new(parent: &Path, records: usize) -> Result<Spill> {
        std::fs::create_dir_all(parent)
            .map_err(|e| Error::io("cannot create spill directory", parent, e))?;
        let dir = tempfile::Builder::new()
            .prefix("capture-")
            .tempdir_in(parent)
            .map_err(|e| Error::io("cannot create spill directory", parent, e))?;
        Ok(Spill {
            dir,
            records: records.max(1),
        })
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// How many records of each kind stay in memory.
    pub fn records(&self) -> usize {
        self.records
    }

    fn sorter<T: Record>(&mut self) -> Result<Sorter<T>> {
        Ok(Sorter::new(self.dir.path().to_path_buf(), self.records))
    }

    /// A collector for the digests of one image of `size` bytes, pushed in block order; its
    /// digest list is written as they come, to a temporary file in `lists` (the directory
    /// it is kept in once the image is committed, see [`crate::digests`]).
    pub fn digests(&mut self, size: u64, lists: &Path) -> Result<DigestCollector> {
        let mut by_digest = self.sorter()?;
        by_digest.reserve(size.div_ceil(crate::image::BLOCK_SIZE));
        Ok(DigestCollector {
            by_digest,
            blocks: BlockDigests::create(lists, size)?,
            count: 0,
            last: None,
            nonzero: Vec::new(),
            fingerprint: Some(crate::records::Fingerprint::new(size)),
        })
    }

    /// [`Spill::digests`] for records whose fingerprint the caller computes itself over the
    /// very bytes it hands to [`DigestCollector::extend_encoded`] (a sidecar's import, whose
    /// decoder must hash them anyway to check the sidecar): finished with
    /// [`DigestCollector::finish_with`], so they are not hashed twice.
    pub fn digests_fingerprinted(&mut self, size: u64, lists: &Path) -> Result<DigestCollector> {
        let mut collector = self.digests(size, lists)?;
        collector.fingerprint = None;
        Ok(collector)
    }

    /// A sorter for redirects, found in digest order, read back by block.
    pub fn redirects(&mut self) -> Result<Sorter<Redirect>> {
        self.sorter()
    }
}

/// A file in `dir` with no name: its blocks go back to the file system when it is closed,
/// so records of an image a rebuild has passed, or of a crashed capture, take no space.
fn unnamed_file(dir: &Path) -> Result<File> {
    tempfile::tempfile_in(dir).map_err(|e| spill_error(dir, e))
}

fn spill_error(dir: &Path, e: std::io::Error) -> Error {
    Error::io("cannot spill capture records", dir, e)
}

/// Collects an image's `(block, digest)` records as they are hashed.
pub struct DigestCollector {
    by_digest: Sorter<ByDigest>,
    blocks: BlockDigests,
    count: u64,
    last: Option<u64>,
    /// Runs of consecutive non-zero blocks: (first block, blocks).
    nonzero: Vec<(u64, u64)>,
    /// `None` when the caller fingerprints the records ([`Spill::digests_fingerprinted`]).
    fingerprint: Option<crate::records::Fingerprint>,
}

impl DigestCollector {
    /// Adds records, which must come in increasing block order. The digest list and the
    /// fingerprint take the same bytes (block u64 LE, digest), encoded once per call: one
    /// write and one hasher update for a whole batch, not two per block.
    pub fn extend(&mut self, records: &[(u64, Digest)]) -> Result<()> {
        let mut encoded = Vec::with_capacity(records.len() * crate::digests::RECORD);
        for &(block, digest) in records {
            encoded.extend_from_slice(&block.to_le_bytes());
            encoded.extend_from_slice(&digest);
        }
        self.extend_encoded(&encoded)
    }

    /// [`DigestCollector::extend`] of records laid out as digest lists store them (block
    /// u64 LE, digest): how a sidecar's import hands them over, with no copy per block.
    pub fn extend_encoded(&mut self, encoded: &[u8]) -> Result<()> {
        const RECORD: usize = crate::digests::RECORD;
        if !encoded.len().is_multiple_of(RECORD) {
            return Err(Error::internal(format!(
                "{} bytes are not digest records",
                encoded.len()
            )));
        }
        for record in encoded.chunks_exact(RECORD) {
            let (block, digest) = crate::digests::decode_record(record);
            if self.last.is_some_and(|last| last >= block) {
                return Err(Error::internal(format!(
                    "block {block} hashed out of order"
                )));
            }
            match self.nonzero.last_mut() {
                Some((start, len)) if *start + *len == block => *len += 1,
                _ => self.nonzero.push((block, 1)),
            }
            self.last = Some(block);
            self.by_digest.push(ByDigest { digest, block })?;
        }
        let count = (encoded.len() / RECORD) as u64;
        self.blocks.push_encoded(encoded, count)?;
        if let Some(fingerprint) = &mut self.fingerprint {
            fingerprint.push_encoded(encoded);
        }
        self.count += count;
        Ok(())
    }

    /// Ends collection: the digest-ordered stream and the block-ordered records.
    pub fn finish(mut self) -> Result<Hashed> {
        let Some(fingerprint) = self.fingerprint.take() else {
            return Err(Error::internal(
                "a collector fingerprinted by its caller finished without it",
            ));
        };
        self.finish_with(fingerprint.finish())
    }

    /// [`DigestCollector::finish`] of a collector from [`Spill::digests_fingerprinted`]:
    /// `fingerprint` is the caller's, over every record it handed over.
    pub fn finish_with(self, fingerprint: String) -> Result<Hashed> {
        let sorted = self.by_digest.finish()?;
        Ok(Hashed {
            sorted,
            blocks: self.blocks.finish()?,
            nonzero: self.nonzero,
            count: self.count,
            fingerprint,
        })
    }
}

/// What hashing one image produced, bounded in memory.
pub struct Hashed {
    /// `(digest, block)` in digest order (consumed by resolution).
    pub sorted: SortedDigests,
    /// `(block, digest)` in block order, readable many times: the image's digest list.
    pub blocks: BlockDigests,
    /// Runs of consecutive non-zero blocks, in order: (first block, blocks). What the map
    /// needs of the list, without reading it back.
    pub nonzero: Vec<(u64, u64)>,
    /// Non-zero blocks.
    pub count: u64,
    pub fingerprint: String,
}

/// Removes spill directories left by captures that a crash interrupted.
pub fn remove_leftovers(parent: &Path) -> Result<usize> {
    let entries = match std::fs::read_dir(parent) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(Error::io("cannot list", parent, e)),
    };
    let mut removed = 0;
    for entry in entries {
        let entry = entry.map_err(|e| Error::io("cannot list", parent, e))?;
        std::fs::remove_dir_all(entry.path())
            .map_err(|e| Error::io("cannot remove stale spill directory", entry.path(), e))?;
        removed += 1;
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(n: u64) -> Digest {
        *blake3::hash(&(n % 97).to_le_bytes()).as_bytes()
    }

    fn collect(records: usize, n: u64) -> (tempfile::TempDir, Hashed) {
        let parent = tempfile::tempdir().unwrap();
        let mut spill = Spill::new(parent.path(), records).unwrap();
        let mut collector = spill.digests(n * 3 * 4096, parent.path()).unwrap();
        let input: Vec<(u64, Digest)> = (0..n).map(|b| (b * 3, digest(b))).collect();
        for chunk in input.chunks(7) {
            collector.extend(chunk).unwrap();
        }
        let hashed = collector.finish().unwrap();
        std::mem::forget(spill);
        (parent, hashed)
    }

    #[test]
    fn spilled_and_in_memory_records_read_back_the_same() {
        let (_a, small) = collect(1 << 20, 1000);
        // 1000 records in runs of 10 (an exact multiple: the last run is full).
        let (_b, spilled) = collect(10, 1000);
        assert!(matches!(small.sorted, Sorted::Memory(_)));
        assert!(matches!(&spilled.sorted, Sorted::Merge(m) if m.readers.len() == 100));
        let sorted_small: Vec<ByDigest> = small.sorted.map(|r| r.unwrap()).collect();
        let sorted_spilled: Vec<ByDigest> = spilled.sorted.map(|r| r.unwrap()).collect();
        assert_eq!(sorted_small, sorted_spilled);
        assert!(sorted_small.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(sorted_small.len(), 1000);
        let read = |b: &BlockDigests| b.iter().unwrap().collect::<Result<Vec<_>>>().unwrap();
        let blocks_small = read(&small.blocks);
        assert_eq!(blocks_small, read(&spilled.blocks));
        // Readable twice.
        assert_eq!(blocks_small, read(&spilled.blocks));
        assert_eq!(blocks_small[5], (15, digest(5)));
        assert_eq!(small.fingerprint, spilled.fingerprint);
        assert_eq!(
            small.fingerprint,
            crate::records::fingerprint(3000 * 4096, &blocks_small)
        );
    }

    #[test]
    fn digest_records_sort_in_their_derived_order() {
        // Digests that share 8-byte prefixes (and whole digests) as well as distinct ones.
        let mut records: Vec<ByDigest> = (0..5000u64)
            .map(|n| {
                let mut digest = digest(n % 700);
                if n % 3 == 0 {
                    digest[..8].copy_from_slice(&[7; 8]);
                }
                ByDigest {
                    digest,
                    block: (n * 7919) % 5000,
                }
            })
            .collect();
        let mut want = records.clone();
        want.sort();
        ByDigest::sort(&mut records);
        assert_eq!(records, want);
        // Below the partition's threshold, one bucket only, and uniform digests.
        for (n, spread) in [(INSERTION_MAX + 1, true), (20_000, false), (70_000, true)] {
            let mut records: Vec<ByDigest> = (0..n as u64)
                .map(|i| {
                    // Duplicates too: each content twice, at different blocks.
                    let mut digest = *blake3::hash(&(i % (n as u64 / 2)).to_le_bytes()).as_bytes();
                    if !spread {
                        digest[0] = 42;
                    }
                    ByDigest {
                        digest,
                        block: (i * 7919) % 100_003,
                    }
                })
                .collect();
            let mut want = records.clone();
            want.sort();
            ByDigest::sort(&mut records);
            assert_eq!(records, want, "{n} records, spread {spread}");
        }
    }

    #[test]
    fn redirects_come_back_in_block_order() {
        let parent = tempfile::tempdir().unwrap();
        let mut spill = Spill::new(parent.path(), 4).unwrap();
        let mut sorter = spill.redirects().unwrap();
        for block in [9u64, 2, 7, 1, 8, 3, 0, 5, 6, 4] {
            sorter
                .push(Redirect {
                    block,
                    image: 1,
                    target: block * 10,
                })
                .unwrap();
        }
        let back: Vec<(u64, u64)> = sorter
            .finish()
            .unwrap()
            .map(|r| r.map(|r| (r.block, r.target)).unwrap())
            .collect();
        assert_eq!(back, (0..10).map(|b| (b, b * 10)).collect::<Vec<_>>());
    }

    #[test]
    fn out_of_order_blocks_are_refused() {
        let parent = tempfile::tempdir().unwrap();
        let mut spill = Spill::new(parent.path(), 4).unwrap();
        let mut collector = spill.digests(4096 * 8, parent.path()).unwrap();
        collector.extend(&[(5, digest(1))]).unwrap();
        assert!(collector.extend(&[(5, digest(2))]).is_err());
    }

    #[test]
    fn leftovers_are_removed() {
        let parent = tempfile::tempdir().unwrap();
        let spill = Spill::new(parent.path(), 4).unwrap();
        std::fs::write(spill.path().join("blocks"), b"x").unwrap();
        let kept = spill.path().to_path_buf();
        std::mem::forget(spill);
        assert_eq!(remove_leftovers(parent.path()).unwrap(), 1);
        assert!(!kept.exists());
        assert_eq!(remove_leftovers(&parent.path().join("absent")).unwrap(), 0);
    }
}
