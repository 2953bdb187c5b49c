//! Digest lists: the `(block, digest)` records of an image's non-zero blocks, in block order,
//! stored once per capture as an immutable file next to the index runs
//! (`index/digests-<image id>.dig`), not in redb.
//!
//! Why a file: the list is written once, read whole by rare operations (forget, index
//! rebuild) and a few records at a time by the image guard's samples. In redb it was copied
//! into pages (power-of-two sized for large values), written with the commit, and every
//! start after an unclean stop read and checksummed all of it again (redb's repair). As a
//! file it is streamed while the image is hashed (so a capture keeps no second copy of it in
//! memory and spills none), synced and renamed before the commit that records the image
//! (as index runs are), and costs nothing at open.
//!
//! Crash safety is that of the runs: a list is complete and synced under its final name
//! before the catalog commits the image; lists whose image the catalog does not hold are
//! leftovers of a crash or of a forget, removed at open ([`remove_orphans`]). Damage is
//! found where the whole list is read: its records must give the image's fingerprint, which
//! the catalog keeps in the image's record (a BLAKE3 of the size and every record).
//!
//! Format: 16 bytes of header (`VMARDGS1`, the image's size as u64 LE), then 40-byte records
//! (block u64 LE, digest), blocks strictly increasing.

use std::fs::{self, File};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::scan::{BlockDigest, Digest};

const MAGIC: &[u8; 8] = b"VMARDGS1";
const HEADER_BYTES: usize = 16;
const HEADER: u64 = HEADER_BYTES as u64;
/// Bytes of one record: block (u64 LE), digest.
pub const RECORD: usize = 8 + 32;
const PREFIX: &str = "digests-";
const SUFFIX: &str = ".dig";

/// Bytes written between two starts of writeback ([`Writeback`]).
const WRITEBACK_STEP: u64 = 8 << 20;

/// Starts writing a file's bytes back to disk as it is written, a few MiB at a time, without
/// waiting: the fsync before the commit then has little left to do. The digest list is
/// written while the image is hashed, so its disk writes overlap the hashing. A hint only:
/// errors are ignored (the fsync reports them).
#[derive(Default)]
struct Writeback {
    written: u64,
    started: u64,
}

impl Writeback {
    /// Counts `len` more bytes written to `file`, and starts writeback of them once
    /// [`WRITEBACK_STEP`] bytes have accumulated.
    fn wrote(&mut self, file: &File, len: usize) {
        use std::os::fd::AsRawFd;
        self.written += len as u64;
        let flushed = self.written;
        if flushed < self.started + WRITEBACK_STEP {
            return;
        }
        let (Ok(offset), Ok(len)) = (
            i64::try_from(self.started),
            i64::try_from(flushed - self.started),
        ) else {
            return;
        };
        // SAFETY: sync_file_range only reads its integer arguments; the descriptor belongs
        // to `file`, open for the duration of the call.
        unsafe {
            nix::libc::sync_file_range(
                file.as_raw_fd(),
                offset,
                len,
                nix::libc::SYNC_FILE_RANGE_WRITE,
            )
        };
        self.started = flushed;
    }
}

/// Bytes a [`FileWriter`] gathers before its thread writes them.
const WRITE_BYTES: usize = 1 << 20;

/// Writes a file on a thread of its own, 1 MiB at a time, with [`Writeback`], hashing what
/// it writes when asked to: the caller only lays the bytes out, and goes on while the
/// kernel copies them (a capture's digest list, an index run).
pub struct FileWriter {
    buf: Vec<u8>,
    /// To the thread; `None` once it was told to stop.
    full: Option<std::sync::mpsc::SyncSender<Vec<u8>>>,
    /// Buffers the thread is done with.
    spent: std::sync::mpsc::Receiver<Vec<u8>>,
    thread: Option<std::thread::JoinHandle<std::io::Result<Written>>>,
}

/// A file a [`FileWriter`] has written: the file, and the BLAKE3 of its bytes if asked.
pub type Written = (File, Option<blake3::Hash>);

impl FileWriter {
    /// Writes `file` from its current position; `hash`: also hashes every byte written.
    pub fn new(mut file: File, hash: bool) -> std::io::Result<FileWriter> {
        let (full, written) = std::sync::mpsc::sync_channel::<Vec<u8>>(2);
        let (spend, spent) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("vmard-writer".into())
            .spawn(move || {
                let mut hasher = hash.then(blake3::Hasher::new);
                let mut writeback = Writeback::default();
                for buf in written {
                    if let Some(hasher) = &mut hasher {
                        hasher.update(&buf);
                    }
                    file.write_all(&buf)?;
                    writeback.wrote(&file, buf.len());
                    let _ = spend.send(buf);
                }
                Ok((file, hasher.map(|h| h.finalize())))
            })?;
        Ok(FileWriter {
            buf: Vec::with_capacity(WRITE_BYTES),
            full: Some(full),
            spent,
            thread: Some(thread),
        })
    }

    /// Appends `bytes`.
    pub fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.buf.extend_from_slice(bytes);
        if self.buf.len() >= WRITE_BYTES {
            self.hand_over()?;
        }
        Ok(())
    }

    /// Hands what is gathered to the thread; a failed thread's error is returned.
    fn hand_over(&mut self) -> std::io::Result<()> {
        let mut next = self
            .spent
            .try_recv()
            .unwrap_or_else(|_| Vec::with_capacity(WRITE_BYTES));
        next.clear();
        let buf = std::mem::replace(&mut self.buf, next);
        if self
            .full
            .as_ref()
            .is_some_and(|full| full.send(buf).is_ok())
        {
            return Ok(());
        }
        self.join().map(|_| ())
    }

    /// Stops the thread after what it was handed, and takes what it wrote.
    fn join(&mut self) -> std::io::Result<Written> {
        self.full = None;
        match self.thread.take().map(std::thread::JoinHandle::join) {
            Some(Ok(written)) => written,
            Some(Err(_)) => Err(std::io::Error::other("the writer thread panicked")),
            None => Err(std::io::Error::other(
                "written after it failed (this is a bug)",
            )),
        }
    }

    /// Writes the rest and returns the file (not synced) and its hash.
    pub fn finish(mut self) -> std::io::Result<Written> {
        if !self.buf.is_empty() {
            self.hand_over()?;
        }
        self.join()
    }
}

impl Drop for FileWriter {
    fn drop(&mut self) {
        if self.thread.is_some() {
            let _ = self.join();
        }
    }
}

/// Path of the digest list of image `id` in `dir` (the index directory).
pub fn list_path(dir: &Path, id: u32) -> PathBuf {
    dir.join(format!("{PREFIX}{id:08x}{SUFFIX}"))
}

fn list_error(path: &Path, e: std::io::Error) -> Error {
    Error::io("cannot write digest list", path, e)
}

fn decode(record: &[u8; RECORD]) -> BlockDigest {
    decode_record(record)
}

/// The block and digest of one record (`record` is [`RECORD`] bytes long).
pub fn decode_record(record: &[u8]) -> BlockDigest {
    let mut b = [0u8; 8];
    b.copy_from_slice(&record[..8]);
    let mut d = [0u8; 32];
    d.copy_from_slice(&record[8..RECORD]);
    (u64::from_le_bytes(b), d)
}

/// The digest list of one image being collected (in block order) or collected: always in a
/// file (under a temporary name until [`BlockDigests::persist`]), never in memory.
pub struct BlockDigests {
    tmp: PathBuf,
    out: Option<FileWriter>,
    file: Option<File>,
    count: u64,
    persisted: bool,
}

impl BlockDigests {
    /// A new, empty list for an image of `size` bytes, in a temporary file of `dir`.
    pub fn create(dir: &Path, size: u64) -> Result<BlockDigests> {
        let (file, tmp) = tempfile::Builder::new()
            .prefix(PREFIX)
            .suffix(".tmp")
            .tempfile_in(dir)
            .and_then(|f| f.keep().map_err(|e| e.error))
            .map_err(|e| list_error(dir, e))?;
        let mut header = [0u8; HEADER_BYTES];
        header[..8].copy_from_slice(MAGIC);
        header[8..].copy_from_slice(&size.to_le_bytes());
        let out = FileWriter::new(file, false).and_then(|mut out| {
            out.write(&header)?;
            Ok(out)
        });
        let mut list = BlockDigests {
            tmp,
            out: None,
            file: None,
            count: 0,
            persisted: false,
        };
        list.out = Some(out.map_err(|e| list_error(&list.tmp, e))?);
        Ok(list)
    }

    /// Appends one record (blocks must increase; the collector checks).
    pub fn push(&mut self, block: u64, digest: &Digest) -> Result<()> {
        let Some(out) = self.out.as_mut() else {
            return Err(Error::internal("digest list pushed after it was finished"));
        };
        let mut record = [0u8; RECORD];
        record[..8].copy_from_slice(&block.to_le_bytes());
        record[8..].copy_from_slice(digest);
        out.write(&record).map_err(|e| list_error(&self.tmp, e))?;
        self.count += 1;
        Ok(())
    }

    /// Appends `count` records already encoded as the list stores them (blocks must
    /// increase; the collector checks).
    pub fn push_encoded(&mut self, records: &[u8], count: u64) -> Result<()> {
        if records.len() as u64 != count * RECORD as u64 {
            return Err(Error::internal(format!(
                "{} bytes are not {count} digest records",
                records.len()
            )));
        }
        let Some(out) = self.out.as_mut() else {
            return Err(Error::internal("digest list pushed after it was finished"));
        };
        out.write(records).map_err(|e| list_error(&self.tmp, e))?;
        self.count += count;
        Ok(())
    }

    /// Ends collection: the records can be read back.
    pub fn finish(mut self) -> Result<BlockDigests> {
        if let Some(out) = self.out.take() {
            let (file, _) = out.finish().map_err(|e| list_error(&self.tmp, e))?;
            self.file = Some(file);
        }
        Ok(self)
    }

    /// Number of records.
    pub fn len(&self) -> u64 {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The records, in block order, from the start.
    pub fn iter(&self) -> Result<Box<dyn Iterator<Item = Result<BlockDigest>> + '_>> {
        let Some(file) = &self.file else {
            return Err(Error::internal("digest list read before it was finished"));
        };
        Ok(Box::new(records(file, &self.tmp, self.count)?))
    }

    /// Syncs the list and gives it its final name `path` (then syncs `path`'s directory):
    /// it must be durable before the commit that records its image. Left in place when
    /// dropped from then on.
    pub fn persist(&mut self, path: &Path) -> Result<()> {
        let file = self
            .file
            .as_ref()
            .ok_or_else(|| Error::internal("digest list persisted before it was finished"))?;
        file.sync_all().map_err(|e| list_error(&self.tmp, e))?;
        crate::fault::point(crate::fault::Step::DigestsWrite)?;
        fs::rename(&self.tmp, path).map_err(|e| list_error(path, e))?;
        self.persisted = true;
        if let Some(dir) = path.parent() {
            File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| Error::io("cannot sync", dir, e))?;
        }
        Ok(())
    }
}

impl Drop for BlockDigests {
    fn drop(&mut self) {
        if !self.persisted {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

/// Records read from a list at a time.
const READ_RECORDS: u64 = 32 * 1024;

/// Streams `count` records of an open list file from the start, read [`READ_RECORDS`] at a
/// time.
fn records(
    file: &File,
    path: &Path,
    count: u64,
) -> Result<impl Iterator<Item = Result<BlockDigest>> + use<>> {
    let mut file = file
        .try_clone()
        .map_err(|e| Error::io("cannot read digest list", path, e))?;
    std::io::Seek::seek(&mut file, std::io::SeekFrom::Start(HEADER))
        .map_err(|e| Error::io("cannot read digest list", path, e))?;
    let path = path.to_path_buf();
    let mut left = count;
    let mut buf = Vec::new();
    let mut at = 0;
    Ok(std::iter::from_fn(move || {
        if left == 0 {
            return None;
        }
        if at == buf.len() {
            let records = usize::try_from(left.min(READ_RECORDS)).unwrap_or(1);
            buf.resize(records * RECORD, 0);
            at = 0;
            if let Err(e) = file.read_exact(&mut buf) {
                left = 0;
                return Some(Err(Error::io("cannot read digest list", &path, e)));
            }
        }
        left -= 1;
        let record = decode_record(&buf[at..at + RECORD]);
        at += RECORD;
        Some(Ok(record))
    }))
}

/// A stored digest list, opened for reading.
pub struct StoredList {
    path: PathBuf,
    file: File,
    size: u64,
    count: u64,
}

impl StoredList {
    /// Opens the list at `path`; checks its header and length.
    pub fn open(path: &Path) -> Result<StoredList> {
        let damaged = |what: String| Error::Catalog {
            dir: path.parent().unwrap_or(path).to_path_buf(),
            message: format!(
                "digest list {} {what}; rebuild the catalog with `vmard --recover`",
                path.display()
            ),
        };
        let file = match File::open(path) {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(damaged("is missing".into()));
            }
            Err(e) => return Err(Error::io("cannot open digest list", path, e)),
        };
        let len = file
            .metadata()
            .map_err(|e| Error::io("cannot stat digest list", path, e))?
            .len();
        let mut header = [0u8; HEADER_BYTES];
        if len < HEADER || file.read_exact_at(&mut header, 0).is_err() || &header[..8] != MAGIC {
            return Err(damaged("has no valid header".into()));
        }
        if !(len - HEADER).is_multiple_of(RECORD as u64) {
            return Err(damaged(format!("is truncated ({len} bytes)")));
        }
        let mut size = [0u8; 8];
        size.copy_from_slice(&header[8..]);
        Ok(StoredList {
            path: path.to_path_buf(),
            file,
            size: u64::from_le_bytes(size),
            count: (len - HEADER) / RECORD as u64,
        })
    }

    /// Size of the image, as recorded in the list.
    pub fn image_size(&self) -> u64 {
        self.size
    }

    /// Every record, in block order.
    pub fn iter(&self) -> Result<impl Iterator<Item = Result<BlockDigest>> + use<>> {
        records(&self.file, &self.path, self.count)
    }

    fn at(&self, i: u64) -> Result<BlockDigest> {
        let mut record = [0u8; RECORD];
        self.file
            .read_exact_at(&mut record, HEADER + i * RECORD as u64)
            .map_err(|e| Error::io("cannot read digest list", &self.path, e))?;
        Ok(decode(&record))
    }

    /// The digest of each of `blocks` (sorted), `None` where the list has no record (a
    /// block that was all zeros). Binary searches that only move forward: a few reads per
    /// block, whatever the list's length.
    pub fn lookup(&self, blocks: &[u64]) -> Result<Vec<Option<Digest>>> {
        let mut found = Vec::with_capacity(blocks.len());
        let mut lo = 0u64;
        for &block in blocks {
            let mut hi = self.count;
            while lo < hi {
                let mid = lo + (hi - lo) / 2;
                if self.at(mid)?.0 < block {
                    lo = mid + 1;
                } else {
                    hi = mid;
                }
            }
            found.push(if lo < self.count {
                let (b, digest) = self.at(lo)?;
                (b == block).then_some(digest)
            } else {
                None
            });
        }
        Ok(found)
    }
}

/// Removes from `dir` digest lists whose image `keep` rejects, and temporary lists (of
/// captures a crash interrupted). A failure only leaves a file for the next open.
pub fn remove_orphans(dir: &Path, keep: impl Fn(u32) -> bool) -> Result<usize> {
    let mut removed = 0;
    let entries = fs::read_dir(dir).map_err(|e| Error::io("cannot list", dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| Error::io("cannot list", dir, e))?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let Some(rest) = name.strip_prefix(PREFIX) else {
            continue;
        };
        let orphan = match rest.strip_suffix(SUFFIX) {
            Some(id) => u32::from_str_radix(id, 16).is_ok_and(|id| !keep(id)),
            None => rest.ends_with(".tmp"),
        };
        if orphan {
            fs::remove_file(entry.path())
                .map_err(|e| Error::io("cannot remove stale digest list", entry.path(), e))?;
            removed += 1;
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(n: u64) -> Digest {
        *blake3::hash(&n.to_le_bytes()).as_bytes()
    }

    #[test]
    fn lists_round_trip_persist_and_look_up() {
        let dir = tempfile::tempdir().unwrap();
        let mut list = BlockDigests::create(dir.path(), 1 << 30).unwrap();
        let records: Vec<(u64, Digest)> = (0..1000u64).map(|n| (n * 3 + 1, digest(n))).collect();
        for (block, d) in &records {
            list.push(*block, d).unwrap();
        }
        let mut list = list.finish().unwrap();
        assert_eq!(list.len(), 1000);
        let read = |l: &BlockDigests| l.iter().unwrap().collect::<Result<Vec<_>>>().unwrap();
        assert_eq!(read(&list), records);
        assert_eq!(read(&list), records, "readable twice");
        let path = list_path(dir.path(), 7);
        list.persist(&path).unwrap();
        drop(list);
        let stored = StoredList::open(&path).unwrap();
        assert_eq!(stored.image_size(), 1 << 30);
        let all: Vec<_> = stored.iter().unwrap().collect::<Result<_>>().unwrap();
        assert_eq!(all, records);
        let found = stored.lookup(&[0, 1, 4, 5, 2998, 3000]).unwrap();
        assert_eq!(
            found,
            vec![
                None,
                Some(digest(0)),
                Some(digest(1)),
                None,
                Some(digest(999)),
                None
            ]
        );
        // Orphans: the list of an image not kept, and temporary files.
        let dropped = BlockDigests::create(dir.path(), 0).unwrap();
        std::mem::forget(dropped);
        assert_eq!(remove_orphans(dir.path(), |id| id == 7).unwrap(), 1);
        assert!(path.exists());
        assert_eq!(remove_orphans(dir.path(), |_| false).unwrap(), 1);
        assert!(!path.exists());
    }

    #[test]
    fn sidecar_records_are_laid_out_as_lists_store_them() {
        // An import hands a sidecar's decoded records to the list as they are.
        assert_eq!(RECORD, crate::sidecar::format::RECORD);
        let mut record = [0u8; RECORD];
        record[..8].copy_from_slice(&77u64.to_le_bytes());
        record[8..].copy_from_slice(&digest(5));
        assert_eq!(
            decode_record(&record),
            crate::sidecar::format::decode_record(&record)
        );
    }

    #[test]
    fn a_file_writer_writes_every_byte_once_in_order_and_hashes_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let mut writer = FileWriter::new(File::create(&path).unwrap(), true).unwrap();
        let mut want = Vec::new();
        // Pieces of every size, many buffers' worth (buffers are recycled).
        for n in 0..3000u32 {
            let piece: Vec<u8> = (0..n).map(|i| (i ^ n).to_le_bytes()[0]).collect();
            writer.write(&piece).unwrap();
            want.extend_from_slice(&piece);
        }
        let (file, sum) = writer.finish().unwrap();
        drop(file);
        assert!(want.len() > 4 * WRITE_BYTES, "{}", want.len());
        assert_eq!(fs::read(&path).unwrap(), want);
        assert_eq!(sum, Some(blake3::hash(&want)));
        let unhashed = FileWriter::new(File::create(&path).unwrap(), false).unwrap();
        assert_eq!(unhashed.finish().unwrap().1, None);
    }

    #[test]
    fn an_unpersisted_list_leaves_nothing_and_damage_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut list = BlockDigests::create(dir.path(), 4096).unwrap();
        list.push(0, &digest(0)).unwrap();
        drop(list.finish().unwrap());
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
        let path = list_path(dir.path(), 1);
        fs::write(&path, b"VMARDGS1\0\0\0\0\0\0\0\0abc").unwrap();
        let err = StoredList::open(&path).err().unwrap();
        assert!(err.to_string().contains("truncated"), "{err}");
        fs::write(&path, b"nothing").unwrap();
        assert!(StoredList::open(&path).is_err());
        let err = StoredList::open(&list_path(dir.path(), 2)).err().unwrap();
        assert!(err.to_string().contains("missing"), "{err}");
    }
}
