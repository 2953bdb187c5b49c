//! The content index: digest -> canonical location, as immutable sorted runs on disk.
//!
//! Why not a B-tree: a capture looks up and inserts one random 32-byte key per block. General
//! key-value stores cost 6-9 µs per such operation here (redb, fjall), an order of magnitude
//! more than hashing the block, and redb's file grew to 8.5 GB for 1.3 M keys. Instead, each
//! capture sorts its own digests, resolves them all at once against the runs (binary searches
//! that only move forward, on memory-mapped files: only the pages touched are read, never the
//! whole index) and writes its new digests as one more sorted run. Runs are merged when a
//! newer one grows to half the size of the one before, so there are O(log n) of them.
//!
//! Runs are written to a temporary file, synced and renamed before the catalog commits the
//! run list that names them; files the catalog does not name are leftovers of a crash and
//! are removed on open. Digests are unique across runs: a run only holds digests no earlier
//! run had.

use std::collections::BTreeSet;
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::error::{Error, Result};
use crate::map::ImageId;
use crate::scan::Digest;
use crate::spill::{ByDigest, Redirect};

/// Bytes of one record: digest, image (u32 LE), block (u64 LE).
const RECORD: usize = 32 + 4 + 8;

/// Granularity of giving mapped pages back (a multiple of the page size).
const RELEASE_UNIT: usize = 1 << 20;

/// One entry of the index: the canonical copy of a content.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Entry {
    pub digest: Digest,
    pub image: ImageId,
    pub block: u64,
}

/// A sorted run, memory-mapped read-only.
#[derive(Debug)]
pub struct Run {
    pub id: u64,
    map: Option<memmap2::Mmap>,
    /// Bytes from the start already given back by [`Run::release_before`].
    released: AtomicUsize,
    /// The checksum of the bytes as its [`RunWriter`] wrote them (none for a run opened
    /// from disk: checking a run means hashing what the file holds, [`checksum`]).
    written_sum: Option<[u8; 32]>,
}

impl Run {
    /// Opens run `id` in `dir`.
    pub fn open(dir: &Path, id: u64) -> Result<Run> {
        let path = run_path(dir, id);
        let file = File::open(&path).map_err(|e| Error::io("cannot open index run", &path, e))?;
        let len = file
            .metadata()
            .map_err(|e| Error::io("cannot stat index run", &path, e))?
            .len();
        if len % RECORD as u64 != 0 {
            return Err(Error::Catalog {
                dir: dir.to_path_buf(),
                message: format!("index run {} is truncated ({len} bytes)", path.display()),
            });
        }
        let map = if len == 0 {
            None
        } else {
            // SAFETY: runs are written once, synced and renamed into place before they are
            // opened, and are never modified afterwards; only this daemon writes the
            // state directory.
            let map = unsafe { memmap2::Mmap::map(&file) }
                .map_err(|e| Error::io("cannot map index run", &path, e))?;
            Some(map)
        };
        Ok(Run {
            id,
            map,
            released: AtomicUsize::new(0),
            written_sum: None,
        })
    }

    /// The checksum of a run this process has just written, taken as it was written (so
    /// naming it does not read it all back); `None` for a run opened from disk.
    pub fn written_checksum(&self) -> Option<[u8; 32]> {
        self.written_sum
    }

    /// Drops the mapped pages before record `index` from this process's memory (they stay
    /// in the page cache, and are read again if touched). Passes over a run move forward,
    /// so calling this behind them keeps vmard's resident memory bounded whatever the size
    /// of the index.
    pub fn release_before(&self, index: usize) {
        let Some(map) = &self.map else { return };
        let end = (index * RECORD).min(map.len()) / RELEASE_UNIT * RELEASE_UNIT;
        let start = self.released.load(Ordering::Relaxed);
        if end <= start {
            return;
        }
        if drop_pages(map, start, end - start).is_ok() {
            self.released.store(end, Ordering::Relaxed);
        }
    }

    /// Drops every mapped page from this process's memory (see [`Run::release_before`]).
    /// Every pass over a run starts from its beginning and ends with this call, so the next
    /// pass counts what it gives back from the start again.
    pub fn release(&self) {
        let Some(map) = &self.map else { return };
        let _ = drop_pages(map, 0, map.len());
        self.released.store(0, Ordering::Relaxed);
    }

    fn bytes(&self) -> &[u8] {
        self.map.as_deref().unwrap_or(&[])
    }

    pub fn len(&self) -> usize {
        self.bytes().len() / RECORD
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn digest_at(&self, i: usize) -> &[u8] {
        &self.bytes()[i * RECORD..i * RECORD + 32]
    }

    pub fn entry_at(&self, i: usize) -> Entry {
        let r = &self.bytes()[i * RECORD..(i + 1) * RECORD];
        let mut digest = [0u8; 32];
        digest.copy_from_slice(&r[..32]);
        let mut image = [0u8; 4];
        image.copy_from_slice(&r[32..36]);
        let mut block = [0u8; 8];
        block.copy_from_slice(&r[36..44]);
        Entry {
            digest,
            image: u32::from_le_bytes(image),
            block: u64::from_le_bytes(block),
        }
    }

    /// Position of the first record at or after `from` whose digest is >= `digest`, and the
    /// entry if its digest is equal. Callers with sorted queries pass the previous position
    /// as `from`, so the search only moves forward.
    fn seek(&self, from: usize, digest: &Digest) -> (usize, Option<Entry>) {
        // Gallop forward from `from`: sorted queries land near each other, so this touches a
        // few records instead of a whole binary search's worth of pages.
        let len = self.len();
        let (mut lo, mut step) = (from, 1);
        while lo + step < len && self.digest_at(lo + step) < digest.as_slice() {
            lo += step;
            step *= 2;
        }
        let mut hi = (lo + step + 1).min(len);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            if self.digest_at(mid) < digest.as_slice() {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        let hit =
            (lo < self.len() && self.digest_at(lo) == digest.as_slice()).then(|| self.entry_at(lo));
        (lo, hit)
    }

    /// Every entry in order; the pages passed are given back as it goes, and all of them
    /// at the end.
    pub fn entries(&self) -> impl Iterator<Item = Entry> + '_ {
        (0..=self.len()).filter_map(|i| {
            if i == self.len() {
                self.release();
                return None;
            }
            if i.is_multiple_of(RELEASE_UNIT / RECORD * 4) {
                self.release_before(i);
            }
            Some(self.entry_at(i))
        })
    }
}

/// Drops `len` bytes of a run's mapping from `offset` out of this process's memory.
fn drop_pages(map: &memmap2::Mmap, offset: usize, len: usize) -> std::io::Result<()> {
    // SAFETY: run mappings are shared, read-only mappings of files that never change;
    // MADV_DONTNEED only drops this process's page table entries, and a later access reads
    // the same bytes from the page cache or the file.
    unsafe { map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, offset, len) }
}

/// blake3 of a run's bytes, which the catalog keeps for every run it names. Reads the run
/// a piece at a time and gives each piece's pages back after hashing it.
pub fn checksum(run: &Run) -> [u8; 32] {
    let mut hasher = blake3::Hasher::new();
    let piece = RELEASE_UNIT * 16;
    for (n, bytes) in run.bytes().chunks(piece).enumerate() {
        hasher.update_rayon(bytes);
        run.release_before((n + 1) * piece / RECORD);
    }
    run.release();
    *hasher.finalize().as_bytes()
}

/// Path of run `id` in `dir`.
pub fn run_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("run-{id:016x}.idx"))
}

/// Writes sorted `entries` as run `id`: to a temporary file, synced, then renamed.
pub fn write_run(dir: &Path, id: u64, entries: impl Iterator<Item = Entry>) -> Result<Run> {
    let mut writer = RunWriter::create(dir, id)?;
    for entry in entries {
        writer.push(entry)?;
    }
    writer.finish()
}

/// A run being written entry by entry, in digest order. Nothing is visible under the run's
/// name until [`RunWriter::finish`]; a writer dropped before that removes its temporary
/// file, so a full disk or a failed capture leaves nothing behind to fill it further.
/// The caller only lays entries out: a thread hashes them (the checksum the catalog keeps)
/// and writes them ([`crate::digests::FileWriter`]) while the next ones are resolved.
pub struct RunWriter {
    dir: PathBuf,
    id: u64,
    tmp: PathBuf,
    out: Option<crate::digests::FileWriter>,
    last: Option<Digest>,
}

impl RunWriter {
    pub fn create(dir: &Path, id: u64) -> Result<RunWriter> {
        let tmp = run_path(dir, id).with_extension("tmp");
        let file = File::create(&tmp).map_err(|e| Error::io("cannot create index run", &tmp, e))?;
        let out = crate::digests::FileWriter::new(file, true);
        let mut writer = RunWriter {
            dir: dir.to_path_buf(),
            id,
            tmp,
            out: None,
            last: None,
        };
        writer.out = Some(out.map_err(|e| Error::io("cannot write index run", &writer.tmp, e))?);
        Ok(writer)
    }

    pub fn push(&mut self, entry: Entry) -> Result<()> {
        if let Some(last) = &self.last
            && !digest_before(last, &entry.digest)
        {
            return Err(Error::Catalog {
                dir: self.dir.clone(),
                message: "index run entries out of order (this is a bug)".into(),
            });
        }
        self.last = Some(entry.digest);
        let mut record = [0u8; RECORD];
        record[..32].copy_from_slice(&entry.digest);
        record[32..36].copy_from_slice(&entry.image.to_le_bytes());
        record[36..].copy_from_slice(&entry.block.to_le_bytes());
        match &mut self.out {
            Some(out) => out
                .write(&record)
                .map_err(|e| Error::io("cannot write index run", &self.tmp, e)),
            None => Ok(()),
        }
    }

    /// Syncs the run and renames it into place: it must be durable before the commit that
    /// names it.
    pub fn finish(mut self) -> Result<Run> {
        let Some(out) = self.out.take() else {
            return Err(Error::Catalog {
                dir: self.dir.clone(),
                message: "index run finished twice (this is a bug)".into(),
            });
        };
        let finished = (|| {
            let (file, sum) = out
                .finish()
                .map_err(|e| Error::io("cannot write index run", &self.tmp, e))?;
            file.sync_all()
                .map_err(|e| Error::io("cannot sync index run", &self.tmp, e))?;
            crate::fault::point(crate::fault::Step::IndexWrite)?;
            let path = run_path(&self.dir, self.id);
            fs::rename(&self.tmp, &path)
                .map_err(|e| Error::io("cannot rename index run", &path, e))?;
            sync_dir(&self.dir)?;
            Ok(sum)
        })();
        let sum = match finished {
            Ok(sum) => sum,
            Err(e) => {
                let _ = fs::remove_file(&self.tmp);
                return Err(e);
            }
        };
        let mut run = Run::open(&self.dir, self.id)?;
        run.written_sum = sum.map(|sum| *sum.as_bytes());
        Ok(run)
    }
}

impl Drop for RunWriter {
    fn drop(&mut self) {
        if self.out.take().is_some() {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

/// Whether digest `a` sorts before `b`: most pairs differ in their first 8 bytes, compared
/// as one integer (a byte-wise compare of 32 was 8 ms of a 2 GiB image's resolution).
fn digest_before(a: &Digest, b: &Digest) -> bool {
    let head = |d: &Digest| {
        let mut bytes = [0u8; 8];
        bytes.copy_from_slice(&d[..8]);
        u64::from_be_bytes(bytes)
    };
    match head(a).cmp(&head(b)) {
        std::cmp::Ordering::Equal => a < b,
        order => order.is_lt(),
    }
}

/// True when the newest run should be merged into the one before it: it has grown to half
/// that one's size. Applied until false, this keeps run sizes roughly halving from oldest to
/// newest, so there are O(log n) runs.
pub fn should_merge(runs: &[Run]) -> bool {
    match runs {
        [.., older, newer] => newer.len() * 2 >= older.len(),
        _ => false,
    }
}

/// Merges two runs into new run `id`, dropping the entries of `dead` (forgotten) images:
/// the live entries of two runs have disjoint digests.
pub fn merge_runs(dir: &Path, id: u64, a: &Run, b: &Run, dead: &BTreeSet<ImageId>) -> Result<Run> {
    let live = |e: &Entry| !dead.contains(&e.image);
    let mut left = a.entries().filter(live).peekable();
    let mut right = b.entries().filter(live).peekable();
    let merged = std::iter::from_fn(move || match (left.peek(), right.peek()) {
        (Some(x), Some(y)) if x.digest <= y.digest => left.next(),
        (Some(_), Some(_)) => right.next(),
        (Some(_), None) => left.next(),
        (None, _) => right.next(),
    });
    write_run(dir, id, merged)
}

/// Makes renames and removals in `dir` durable.
pub fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io("cannot sync", dir, e))
}

/// Removes files in `dir` that are not runs listed in `keep` (leftovers of a crash).
pub fn remove_orphans(dir: &Path, keep: &BTreeSet<u64>) -> Result<usize> {
    let mut removed = 0;
    let entries = fs::read_dir(dir).map_err(|e| Error::io("cannot list", dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| Error::io("cannot list", dir, e))?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let id = name
            .strip_prefix("run-")
            .and_then(|n| n.strip_suffix(".idx"))
            .and_then(|n| u64::from_str_radix(n, 16).ok());
        let orphan = match id {
            Some(id) => !keep.contains(&id),
            None => name.starts_with("run-") && name.ends_with(".tmp"),
        };
        if orphan {
            fs::remove_file(entry.path())
                .map_err(|e| Error::io("cannot remove stale index run", entry.path(), e))?;
            removed += 1;
        }
    }
    Ok(removed)
}

/// Resolves the non-zero blocks of image `image`, given in digest order (ties in block
/// order), against `runs`: a content already indexed redirects to its canonical copy; a new
/// content is canonical at its first block in this image (`new` gets its index entry, in
/// digest order: the image's new run), and its later copies redirect there. `redirect` gets
/// every block served from elsewhere; the blocks neither names are the image's own. Entries
/// of `dead` (forgotten) images are skipped.
/// Memory does not grow with the image: one content is looked at at a time.
pub fn resolve(
    image: ImageId,
    sorted: impl Iterator<Item = Result<ByDigest>>,
    runs: &[Run],
    dead: &BTreeSet<ImageId>,
    mut new: impl FnMut(Entry) -> Result<()>,
    mut redirect: impl FnMut(Redirect) -> Result<()>,
) -> Result<()> {
    let mut cursors = vec![0usize; runs.len()];
    let mut current: Option<(Digest, ImageId, u64)> = None;
    let mut groups = 0usize;
    for record in sorted {
        let ByDigest { digest, block } = record?;
        if let Some((seen, image, target)) = current
            && seen == digest
        {
            redirect(Redirect {
                block,
                image,
                target,
            })?;
            continue;
        }
        groups += 1;
        if groups.is_multiple_of(1024) {
            // Lookups only move forward: what lies behind them is not read again.
            for (run, cursor) in runs.iter().zip(&cursors) {
                run.release_before(*cursor);
            }
        }
        let mut found = None;
        for (run, cursor) in runs.iter().zip(cursors.iter_mut()) {
            let (pos, hit) = run.seek(*cursor, &digest);
            *cursor = pos;
            // An entry of a forgotten image is no copy: a later run may hold the content's
            // new canonical copy.
            if let Some(entry) = hit
                && !dead.contains(&entry.image)
            {
                found = hit;
                break;
            }
        }
        match found {
            Some(entry) => {
                redirect(Redirect {
                    block,
                    image: entry.image,
                    target: entry.block,
                })?;
                current = Some((digest, entry.image, entry.block));
            }
            None => {
                new(Entry {
                    digest,
                    image,
                    block,
                })?;
                current = Some((digest, image, block));
            }
        }
    }
    for run in runs {
        run.release();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(n: u8) -> Digest {
        let mut digest = [0u8; 32];
        digest[0] = n;
        digest[31] = n.wrapping_mul(7);
        digest
    }

    #[test]
    fn runs_round_trip_and_seek() {
        let dir = tempfile::tempdir().unwrap();
        let entries: Vec<Entry> = (0..50u8)
            .map(|n| Entry {
                digest: d(n * 2),
                image: u32::from(n),
                block: u64::from(n) * 1000,
            })
            .collect();
        let run = write_run(dir.path(), 1, entries.iter().copied()).unwrap();
        assert_eq!(run.len(), 50);
        // The checksum taken while writing is that of the file; a run opened from disk has
        // none (it must be hashed to be checked).
        let opened = Run::open(dir.path(), 1).unwrap();
        assert_eq!(opened.written_checksum(), None);
        assert_eq!(run.written_checksum(), Some(checksum(&opened)));
        assert_eq!(run.entries().collect::<Vec<_>>(), entries);
        let (pos, hit) = run.seek(0, &d(20));
        assert_eq!((pos, hit), (10, Some(entries[10])));
        let (pos, hit) = run.seek(pos, &d(21));
        assert_eq!((pos, hit), (11, None));
        assert_eq!(run.seek(0, &d(255)), (50, None));
        // Out of order input is refused, not written.
        let bad = [entries[1], entries[0]];
        assert!(write_run(dir.path(), 2, bad.into_iter()).is_err());
        let empty = write_run(dir.path(), 3, std::iter::empty()).unwrap();
        assert!(empty.is_empty());
        assert_eq!(empty.seek(0, &d(1)), (0, None));
    }

    #[test]
    fn merging_keeps_order_and_orphans_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let entry = |n: u8| Entry {
            digest: d(n),
            image: 0,
            block: u64::from(n),
        };
        let a = write_run(dir.path(), 1, [1, 4, 9].map(entry).into_iter()).unwrap();
        let b = write_run(dir.path(), 2, [2, 3, 10, 11].map(entry).into_iter()).unwrap();
        let c = merge_runs(dir.path(), 3, &a, &b, &BTreeSet::new()).unwrap();
        let digests: Vec<u8> = c.entries().map(|e| e.digest[0]).collect();
        assert_eq!(digests, vec![1, 2, 3, 4, 9, 10, 11]);
        fs::write(dir.path().join("run-0000000000000009.tmp"), b"x").unwrap();
        let removed = remove_orphans(dir.path(), &BTreeSet::from([3])).unwrap();
        assert_eq!(removed, 3);
        assert!(run_path(dir.path(), 3).exists());
        assert!(!run_path(dir.path(), 1).exists());
    }

    #[test]
    fn runs_merge_when_the_newest_reaches_half_the_one_before() {
        let dir = tempfile::tempdir().unwrap();
        let run = |id: u64, n: u8| {
            let entries = (0..n).map(|i| Entry {
                digest: d(i),
                image: 0,
                block: u64::from(i),
            });
            write_run(dir.path(), id, entries).unwrap()
        };
        assert!(!should_merge(&[]));
        assert!(!should_merge(&[run(1, 8)]));
        assert!(!should_merge(&[run(2, 8), run(3, 3)]));
        assert!(should_merge(&[run(4, 8), run(5, 4)]));
        assert!(should_merge(&[run(6, 100), run(7, 8), run(8, 4)]));
    }

    #[test]
    fn resolution_prefers_index_then_first_copy() {
        let dir = tempfile::tempdir().unwrap();
        let run = write_run(
            dir.path(),
            1,
            [Entry {
                digest: d(5),
                image: 0,
                block: 77,
            }]
            .into_iter(),
        )
        .unwrap();
        let blocks = [(0, d(9)), (1, d(5)), (2, d(9)), (3, d(1)), (4, d(5))];
        let mut sorted: Vec<ByDigest> = blocks
            .iter()
            .map(|&(block, digest)| ByDigest { digest, block })
            .collect();
        sorted.sort();
        let (mut new, mut redirects) = (Vec::new(), Vec::new());
        resolve(
            2,
            sorted.into_iter().map(Ok),
            &[run],
            &BTreeSet::new(),
            |e| {
                new.push((e.digest[0], e.image, e.block));
                Ok(())
            },
            |r| {
                redirects.push((r.block, r.image, r.target));
                Ok(())
            },
        )
        .unwrap();
        assert_eq!(new, vec![(1, 2, 3), (9, 2, 0)]);
        redirects.sort();
        assert_eq!(redirects, vec![(1, 0, 77), (2, 2, 0), (4, 0, 77)]);
    }

    #[test]
    fn entries_of_forgotten_images_are_skipped_and_merged_away() {
        let dir = tempfile::tempdir().unwrap();
        let entry = |n: u8, image: ImageId| Entry {
            digest: d(n),
            image,
            block: u64::from(n),
        };
        // Image 1 is forgotten; its content 5 moved to image 3 (a later run).
        let old = write_run(dir.path(), 1, [entry(2, 0), entry(5, 1)].into_iter()).unwrap();
        let new = write_run(dir.path(), 2, [entry(5, 3)].into_iter()).unwrap();
        let dead = BTreeSet::from([1]);
        let lookup = |runs: &[Run], dead: &BTreeSet<ImageId>| {
            let mut redirects = Vec::new();
            let sorted = [ByDigest {
                digest: d(5),
                block: 9,
            }];
            resolve(
                7,
                sorted.into_iter().map(Ok),
                runs,
                dead,
                |_| Ok(()),
                |r| {
                    redirects.push((r.image, r.target));
                    Ok(())
                },
            )
            .unwrap();
            redirects
        };
        let runs = [old, new];
        assert_eq!(lookup(&runs, &dead), vec![(3, 5)]);
        assert_eq!(lookup(&runs, &BTreeSet::new()), vec![(1, 5)]);
        let merged = merge_runs(dir.path(), 3, &runs[0], &runs[1], &dead).unwrap();
        let images: Vec<ImageId> = merged.entries().map(|e| e.image).collect();
        assert_eq!(images, vec![0, 3]);
        // Without dropping the dead entry, the two runs' entries for content 5 collide.
        assert!(merge_runs(dir.path(), 4, &runs[0], &runs[1], &BTreeSet::new()).is_err());
    }

    /// Resident kilobytes of the mappings of `path` in this process.
    fn resident_kib(path: &Path) -> u64 {
        let smaps = fs::read_to_string("/proc/self/smaps").unwrap();
        let name = path.to_string_lossy();
        let mut ours = false;
        let mut kib = 0;
        for line in smaps.lines() {
            if line
                .split_whitespace()
                .nth(1)
                .is_some_and(|f| f.contains('-'))
                && line.contains(' ')
                && !line.starts_with(char::is_uppercase)
            {
                ours = line.ends_with(name.as_ref());
            } else if ours && let Some(rss) = line.strip_prefix("Rss:") {
                kib += rss.trim().trim_end_matches(" kB").parse::<u64>().unwrap();
            }
        }
        kib
    }

    #[test]
    fn passes_over_a_run_give_its_pages_back() {
        let dir = tempfile::tempdir().unwrap();
        let digest = |n: u64| *blake3::hash(&n.to_le_bytes()).as_bytes();
        let mut entries: Vec<Entry> = (0..1_000_000u64)
            .map(|n| Entry {
                digest: digest(n),
                image: 0,
                block: n,
            })
            .collect();
        entries.sort();
        let run = write_run(dir.path(), 1, entries.into_iter()).unwrap();
        let path = run_path(dir.path(), 1);
        // Written in many pieces: its checksum is still the whole file's.
        assert_eq!(
            run.written_checksum(),
            Some(checksum(&Run::open(dir.path(), 1).unwrap()))
        );
        // 44 MB of entries; each pass keeps only a few MiB mapped at a time, and none after.
        for pass in 0..2 {
            assert_eq!(run.entries().count(), 1_000_000);
            assert!(
                resident_kib(&path) < 1024,
                "after pass {pass}: {} KiB",
                resident_kib(&path)
            );
            checksum(&run);
            assert!(resident_kib(&path) < 1024, "after checksum {pass}");
        }
        let mut sorted: Vec<ByDigest> = (0..300_000u64)
            .map(|n| ByDigest {
                digest: digest(n * 3),
                block: n,
            })
            .collect();
        sorted.sort();
        let mut peak = 0;
        let mut found = 0;
        let runs = [run];
        resolve(
            1,
            sorted.into_iter().map(Ok),
            &runs,
            &BTreeSet::new(),
            |_| Ok(()),
            |_| {
                found += 1;
                if found % 10_000 == 0 {
                    peak = peak.max(resident_kib(&path));
                }
                Ok(())
            },
        )
        .unwrap();
        assert_eq!(found, 300_000);
        assert!(peak < 8 * 1024, "lookups kept {peak} KiB of the run mapped");
        assert!(resident_kib(&path) < 1024);
    }

    #[test]
    fn an_unfinished_run_leaves_no_file() {
        let dir = tempfile::tempdir().unwrap();
        let mut writer = RunWriter::create(dir.path(), 4).unwrap();
        writer
            .push(Entry {
                digest: d(1),
                image: 0,
                block: 0,
            })
            .unwrap();
        drop(writer);
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
