//! Digest sidecars: the block digests of an image on shared storage, written beside it (or in
//! a sidecar directory on the share) by the host that hashed it, so that other hosts capture
//! the image without reading it. [`format`] is the file format (pure); this module finds,
//! trusts, imports and writes sidecar files.
//!
//! Binding: a sidecar records the image's size, mtime and ctime (nanoseconds), which every
//! NFS client sees alike (the server's attributes), unlike device and inode numbers. ctime
//! cannot be set by a writer, so content written after the sidecar (even with the mtime put
//! back) makes it stale. A random sample of blocks is read and compared on every import,
//! which catches a sidecar that lies about the content while keeping its identity.
//!
//! Trust: with `sidecar_key` (a file of random bytes shared by the fleet) a sidecar is
//! accepted only when its keyed BLAKE3 MAC checks out, whoever owns the file: that works
//! with NFS `root_squash` (where root's files belong to nobody). Without a key, the seal is a
//! checksum anyone can recompute, so a sidecar is accepted only when owned by vmard's user
//! and not writable by group or others.
//!
//! Writes are atomic: a temporary file (O_EXCL, random name) is written, fsynced and renamed
//! over the sidecar's name, which NFS does on the server in one step. Two hosts capturing at
//! once each rename a complete sidecar of the same image; one wins, neither is torn.

pub mod format;

use std::fs::File;
use std::io::BufWriter;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::image::{BLOCK_SIZE, ImageFile};
use crate::scan::{Digest, ScanStats, hash_block, is_zero};
use crate::units::usize_of;
use format::{DecodeError, Decoder, Encoder, Header, RECORD, Seal, decode_record};

pub use crate::config::SidecarMode as Mode;

/// Default fraction of an imported image's blocks read and compared with the sidecar.
pub const DEFAULT_SAMPLE: f64 = 0.001;
/// Suffix of sidecar file names.
pub const SUFFIX: &str = ".vmar-digests";

/// How this host uses sidecars.
#[derive(Debug)]
pub struct Sidecars {
    mode: Mode,
    dir: Option<PathBuf>,
    seal: Seal,
    sample: f64,
}

/// Why a sidecar was not used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub kind: &'static str,
    pub message: String,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.kind, self.message)
    }
}

fn refuse(kind: &'static str, message: impl Into<String>) -> Refusal {
    Refusal {
        kind,
        message: message.into(),
    }
}

impl From<DecodeError> for Refusal {
    fn from(e: DecodeError) -> Refusal {
        match e {
            DecodeError::Corrupt(m) => refuse("corrupt", m),
            DecodeError::Untrusted(m) => refuse("untrusted", m),
            DecodeError::Io(m) => refuse("io", m),
        }
    }
}

/// What a capture did with a sidecar, reported in its result.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SidecarReport {
    /// The sidecar's path.
    pub path: PathBuf,
    /// The digests came from the sidecar, not from reading the image.
    #[serde(default)]
    pub imported: bool,
    /// Blocks read from the image to check the sidecar.
    #[serde(default)]
    pub sampled_blocks: u64,
    /// Why a sidecar found there was not used (then the image was hashed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refused: Option<String>,
    /// A new sidecar was written.
    #[serde(default)]
    pub written: bool,
    /// Why writing one failed (the capture itself succeeded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub write_error: Option<String>,
}

/// An image whose digests came from a sidecar.
pub struct Imported {
    pub scan: ScanStats,
    pub sampled_blocks: u64,
    pub fingerprint: String,
}

impl Sidecars {
    /// Sidecar use as configured; `None` when off. `key` is the fleet key file, which must
    /// be readable by its owner only.
    pub fn new(
        mode: Mode,
        dir: Option<PathBuf>,
        key: Option<&Path>,
        sample: f64,
    ) -> Result<Option<Sidecars>> {
        if mode == Mode::Off {
            return Ok(None);
        }
        let config_error = |path: &Path, message: String| Error::Config {
            path: path.to_path_buf(),
            message,
        };
        if !(0.0..=1.0).contains(&sample) {
            return Err(config_error(
                Path::new(crate::config::DEFAULT_CONFIG),
                format!("sidecar_sample = {sample}: give a fraction between 0 and 1"),
            ));
        }
        let seal = match key {
            None => Seal::Checksum,
            Some(path) => {
                let meta =
                    std::fs::metadata(path).map_err(|e| Error::io("cannot read", path, e))?;
                if meta.mode() & 0o077 != 0 {
                    return Err(config_error(
                        path,
                        "the fleet key is readable or writable by group or others; chmod 600 it"
                            .into(),
                    ));
                }
                let material =
                    std::fs::read(path).map_err(|e| Error::io("cannot read", path, e))?;
                if material.len() < 16 {
                    return Err(config_error(
                        path,
                        "the fleet key is shorter than 16 bytes; make one with `head -c 32 /dev/urandom`"
                            .into(),
                    ));
                }
                Seal::from_key_material(&material)
            }
        };
        Ok(Some(Sidecars {
            mode,
            dir,
            seal,
            sample,
        }))
    }

    /// From vmar.toml's `sidecars`, `sidecar_dir`, `sidecar_key`, `sidecar_sample`.
    pub fn from_config(config: &crate::config::Config) -> Result<Option<Sidecars>> {
        Sidecars::new(
            config.sidecars.unwrap_or_default(),
            config.sidecar_dir.clone(),
            config.sidecar_key.as_deref(),
            config.sidecar_sample.unwrap_or(DEFAULT_SAMPLE),
        )
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    pub fn writes(&self) -> bool {
        self.mode == Mode::Write
    }

    /// The sidecar of the image at `image`: `.NAME.vmar-digests` beside it, or
    /// `NAME.vmar-digests` in the sidecar directory (hidden beside images, so that
    /// auto-capture and image listings pass it over).
    pub fn path_for(&self, image: &Path) -> Option<PathBuf> {
        let name = image.file_name()?.to_string_lossy();
        Some(match &self.dir {
            Some(dir) => dir.join(format!("{name}{SUFFIX}")),
            None => image.parent()?.join(format!(".{name}{SUFFIX}")),
        })
    }

    /// Reads the sidecar of `image` and hands its digests to `consume` in block order, laid
    /// out as digest lists store them (block u64 LE, digest; [`format::RECORD`]
    /// bytes each), while a random sample of the image's blocks is read (in offset order,
    /// on another thread) and checked against them at the end. On `Err` whatever `consume`
    /// received must be thrown away.
    pub fn import(
        &self,
        image: &ImageFile,
        consume: &mut dyn FnMut(&[u8]) -> Result<()>,
    ) -> std::result::Result<Imported, Refusal> {
        let path = self
            .path_for(&image.path)
            .ok_or_else(|| refuse("absent", "the image path has no file name"))?;
        let file = match open_sidecar(&path) {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(refuse("absent", "no sidecar"));
            }
            Err(e) => return Err(refuse("io", format!("cannot open: {e}"))),
        };
        let meta = file
            .metadata()
            .map_err(|e| refuse("io", format!("cannot stat: {e}")))?;
        if !meta.is_file() {
            return Err(refuse("untrusted", "not a regular file"));
        }
        if self.seal == Seal::Checksum {
            let euid = nix::unistd::geteuid().as_raw();
            if meta.uid() != euid || meta.mode() & 0o022 != 0 {
                return Err(refuse(
                    "untrusted",
                    format!(
                        "owned by uid {} with mode {:o}; without a fleet key (sidecar_key) only \
                         files owned by uid {euid} and not writable by others are trusted",
                        meta.uid(),
                        meta.mode() & 0o7777
                    ),
                ));
            }
        }
        let mut decoder = Decoder::new(file, &self.seal)?;
        let header = *decoder.header();
        let identity = &image.identity;
        let mut stale = Vec::new();
        if header.size != image.size {
            stale.push(format!("size {} -> {}", header.size, image.size));
        }
        if header.mtime_ns != identity.mtime_ns {
            stale.push("modification time differs".into());
        }
        if Some(header.ctime_ns) != identity.ctime_ns {
            stale.push("inode change time differs".into());
        }
        if !stale.is_empty() {
            return Err(refuse(
                "stale",
                format!(
                    "the image changed since it was written ({})",
                    stale.join(", ")
                ),
            ));
        }
        let blocks = header.blocks();
        let samples = self.pick_samples(blocks);
        let started = std::time::Instant::now();
        // The sample is read while the sidecar is decoded: on a cold cache its reads are
        // the import's only image I/O, and they wait on the disk, not on the CPU.
        let stop = std::sync::atomic::AtomicBool::new(false);
        let (decoded, sampled) = std::thread::scope(|scope| {
            let sampler = scope.spawn(|| read_samples(image, &samples, &stop));
            let decoded = decode_all(&mut decoder, &samples, IMPORT_BATCH, consume);
            if decoded.is_err() {
                stop.store(true, std::sync::atomic::Ordering::Relaxed);
            }
            let sampled = sampler
                .join()
                .unwrap_or_else(|_| Err(refuse("io", "the sample reader panicked")));
            (decoded, sampled)
        });
        let expected = decoded?;
        let decoded_at = started.elapsed();
        let (found, bytes_read) = sampled?;
        if found.len() != samples.len() {
            return Err(refuse("io", "the sample was not read whole"));
        }
        for ((&block, expected), found) in samples.iter().zip(&expected).zip(&found) {
            if expected != found {
                return Err(refuse(
                    "mismatch",
                    format!("block {block} of the image differs from the sidecar's digest"),
                ));
            }
        }
        tracing::debug!(
            image = %image.path.display(),
            decoded = ?decoded_at,
            sampled = ?started.elapsed(),
            "sidecar read and checked"
        );
        let nonzero = decoder.nonzero();
        Ok(Imported {
            scan: ScanStats {
                blocks,
                hole_blocks: 0,
                zero_blocks: blocks - nonzero,
                hashed_blocks: nonzero,
                bytes_read,
            },
            sampled_blocks: samples.len() as u64,
            fingerprint: decoder.fingerprint(),
        })
    }

    /// Sorted distinct blocks to check: the configured fraction, at least one when it is
    /// not 0. Chosen by the OS-seeded generator, so a writer cannot tell which.
    fn pick_samples(&self, blocks: u64) -> Vec<u64> {
        if self.sample <= 0.0 || blocks == 0 {
            return Vec::new();
        }
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let wanted = ((blocks as f64 * self.sample).ceil() as u64).clamp(1, blocks);
        let (Ok(n), Ok(k)) = (usize::try_from(blocks), usize::try_from(wanted)) else {
            return Vec::new();
        };
        let mut picked: Vec<u64> = rand::seq::index::sample(&mut rand::rng(), n, k)
            .into_iter()
            .map(|i| i as u64)
            .collect();
        picked.sort_unstable();
        picked
    }

    /// A writer of the sidecar of `image` (a regular file), to be fed its digests while
    /// they are hashed and committed once the capture checked the image did not change.
    pub fn writer(&self, image: &ImageFile) -> std::result::Result<SidecarWriter, String> {
        if image.is_block_device {
            return Err("block devices get no sidecar".into());
        }
        let path = self
            .path_for(&image.path)
            .ok_or_else(|| "the image path has no file name".to_string())?;
        let parent = path.parent().unwrap_or(Path::new("/")).to_path_buf();
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let tmp = parent.join(format!(
            ".{}.{}.{:016x}.tmp",
            name.trim_start_matches('.'),
            std::process::id(),
            rand::random::<u64>()
        ));
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .custom_flags(nix::libc::O_NOFOLLOW)
            .open(&tmp)
            .map_err(|e| format!("cannot create {}: {e}", tmp.display()))?;
        let header = Header {
            size: image.size,
            mtime_ns: image.identity.mtime_ns,
            ctime_ns: image.identity.ctime_ns.unwrap_or(0),
        };
        let out = BufWriter::with_capacity(1 << 20, file);
        let encoder = Encoder::new(out, &header, &self.seal);
        let mut writer = SidecarWriter {
            tmp,
            path,
            encoder: None,
            error: None,
        };
        match encoder {
            Ok(encoder) => writer.encoder = Some(encoder),
            Err(e) => writer.fail(format!("cannot write: {e}")),
        }
        Ok(writer)
    }
}

/// Opens a sidecar without following a symlink and without blocking on a FIFO.
fn open_sidecar(path: &Path) -> std::io::Result<File> {
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_NONBLOCK)
        .open(path)
}

/// Records handed to `consume` at a time by [`Sidecars::import`]: 640 KiB, still long
/// updates of the fingerprint and writes of the digest list, and small enough that the
/// batches in flight stay in the CPU's caches between the decoder writing them and the
/// catalog reading them. Batches of 65,536 (2.5 MiB) took about 10% longer and 1,400 more
/// page faults per 2 GiB import (docs/benchmarks.md, sidecar import).
const IMPORT_BATCH: usize = 16 * 1024;

/// Decodes every record of `decoder` into `consume`, and picks out the digests the sidecar
/// gives for `samples` (sorted blocks; `None`: no record, a zero block). Reading, checking
/// and laying out the records (this thread's work) overlaps `consume` (the caller's: the
/// digest list's writes, the records to sort) batch by batch, on another thread.
fn decode_all<R: std::io::Read + Send>(
    decoder: &mut Decoder<R>,
    samples: &[u64],
    batch_records: usize,
    consume: &mut dyn FnMut(&[u8]) -> Result<()>,
) -> std::result::Result<Vec<Option<Digest>>, Refusal> {
    let (full, decoded) = std::sync::mpsc::sync_channel::<Vec<u8>>(1);
    let (spent, empty) = std::sync::mpsc::channel::<Vec<u8>>();
    let capacity = (batch_records + usize_of(format::SEGMENT_BLOCKS)) * RECORD;
    std::thread::scope(|scope| {
        let reader = scope.spawn(move || {
            let mut expected = vec![None; samples.len()];
            let mut next_sample = 0;
            loop {
                let mut batch = empty
                    .try_recv()
                    .unwrap_or_else(|_| Vec::with_capacity(capacity));
                batch.clear();
                if !decoder.next_batch(&mut batch, batch_records)? {
                    return Ok(expected);
                }
                pick_samples(&batch, samples, &mut next_sample, &mut expected);
                if full.send(batch).is_err() {
                    // The consumer failed, and says why.
                    return Ok(expected);
                }
            }
        });
        let mut consumed = Ok(());
        for batch in decoded {
            if let Err(e) = consume(&batch) {
                consumed = Err(refuse("io", e.to_string()));
                // Dropping the receiver stops the reader at its next batch.
                break;
            }
            let _ = spent.send(batch);
        }
        let expected = reader
            .join()
            .unwrap_or_else(|_| Err(refuse("io", "the sidecar reader panicked")));
        consumed.and(expected)
    })
}

/// Puts the digest of each of `samples` (from `next`) that is up to `batch`'s last block
/// into `expected`: such a block has its record in this batch, or none (a zero block).
fn pick_samples(batch: &[u8], samples: &[u64], next: &mut usize, expected: &mut [Option<Digest>]) {
    let records = batch.len() / RECORD;
    let block_at = |i: usize| decode_record(&batch[i * RECORD..]).0;
    let Some(last) = records.checked_sub(1).map(block_at) else {
        return;
    };
    let mut lo = 0;
    while let Some(&sample) = samples.get(*next).filter(|&&s| s <= last) {
        let (mut l, mut hi) = (lo, records);
        while l < hi {
            let mid = l + (hi - l) / 2;
            if block_at(mid) < sample {
                l = mid + 1;
            } else {
                hi = mid;
            }
        }
        lo = l;
        let (block, digest) = decode_record(&batch[l * RECORD..]);
        if block == sample {
            expected[*next] = Some(digest);
        }
        *next += 1;
    }
}

/// Reads blocks `samples` (sorted) of the image, in offset order, after asking the kernel
/// for all of them at once (`POSIX_FADV_WILLNEED`: on a cold cache the disk gets them queued,
/// not one at a time): each block's digest, `None` for a zero block. Gives up when `stop` is
/// set (the decoding failed).
fn read_samples(
    image: &ImageFile,
    samples: &[u64],
    stop: &std::sync::atomic::AtomicBool,
) -> std::result::Result<(Vec<Option<Digest>>, u64), Refusal> {
    let range = |block: u64| {
        let start = block * BLOCK_SIZE;
        (
            start,
            usize_of(image.size.saturating_sub(start).min(BLOCK_SIZE)),
        )
    };
    for &block in samples {
        let (start, len) = range(block);
        if let (Ok(offset), Ok(len)) = (i64::try_from(start), i64::try_from(len)) {
            // A hint: a failure only costs the read its wait.
            let _ = nix::fcntl::posix_fadvise(
                std::os::fd::AsRawFd::as_raw_fd(&image.file),
                offset,
                len,
                nix::fcntl::PosixFadviseAdvice::POSIX_FADV_WILLNEED,
            );
        }
    }
    let mut found = Vec::with_capacity(samples.len());
    let mut bytes_read = 0;
    let mut buf = vec![0u8; usize_of(BLOCK_SIZE)];
    for &block in samples {
        if stop.load(std::sync::atomic::Ordering::Relaxed) {
            break;
        }
        let (start, len) = range(block);
        let data = &mut buf[..len];
        image
            .file
            .read_exact_at(data, start)
            .map_err(|e| refuse("io", format!("cannot read block {block} of the image: {e}")))?;
        bytes_read += len as u64;
        found.push((!is_zero(data)).then(|| hash_block(data)));
    }
    Ok((found, bytes_read))
}

/// A sidecar being written to a temporary file; removed unless committed.
pub struct SidecarWriter {
    tmp: PathBuf,
    path: PathBuf,
    encoder: Option<Encoder<BufWriter<File>>>,
    error: Option<String>,
}

impl SidecarWriter {
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn fail(&mut self, message: String) {
        self.encoder = None;
        self.error.get_or_insert(message);
        let _ = std::fs::remove_file(&self.tmp);
    }

    /// Adds digests; a failure is remembered for [`SidecarWriter::commit`], never returned:
    /// a sidecar that cannot be written must not fail the capture.
    pub fn push(&mut self, records: &[(u64, Digest)]) {
        if let Some(encoder) = &mut self.encoder
            && let Err(e) = encoder.push(records)
        {
            self.fail(format!("cannot write {}: {e}", self.tmp.display()));
        }
    }

    /// Seals, syncs and renames the sidecar into place; `fingerprint` (the capture's) must
    /// be what the sidecar describes.
    pub fn commit(mut self, fingerprint: &str) -> std::result::Result<PathBuf, String> {
        let result = self.finish(fingerprint);
        if let Err(e) = &result {
            self.fail(e.clone());
        }
        result
    }

    fn finish(&mut self, fingerprint: &str) -> std::result::Result<PathBuf, String> {
        if let Some(error) = &self.error {
            return Err(error.clone());
        }
        let encoder = self.encoder.take().ok_or("nothing written")?;
        let tmp = self.tmp.clone();
        let failed =
            |what: &str, e: std::io::Error| format!("cannot {what} {}: {e}", tmp.display());
        let (out, written) = encoder.finish().map_err(|e| failed("write", e))?;
        if written != fingerprint {
            return Err(format!(
                "the sidecar's fingerprint {written} is not the capture's {fingerprint} (this is a bug)"
            ));
        }
        let file = out
            .into_inner()
            .map_err(|e| failed("write", e.into_error()))?;
        file.sync_all().map_err(|e| failed("sync", e))?;
        drop(file);
        std::fs::rename(&self.tmp, &self.path).map_err(|e| failed("rename", e))?;
        if let Some(parent) = self.path.parent()
            && let Ok(dir) = File::open(parent)
        {
            // Best effort: the rename is what other hosts see; the sync makes it outlive a
            // crash of the server's disk cache.
            let _ = dir.sync_all();
        }
        self.error = Some("committed".into());
        Ok(self.path.clone())
    }
}

impl Drop for SidecarWriter {
    fn drop(&mut self) {
        if self.error.as_deref() != Some("committed") {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn image(dir: &Path, blocks: &[u8]) -> ImageFile {
        let path = dir.join("img.raw");
        let mut bytes = Vec::new();
        for &b in blocks {
            bytes.extend(std::iter::repeat_n(b, usize_of(BLOCK_SIZE)));
        }
        std::fs::write(&path, &bytes).unwrap();
        ImageFile::open(&path).unwrap()
    }

    fn digests_of(image: &ImageFile) -> Vec<(u64, Digest)> {
        let mut all = Vec::new();
        crate::scan::hash_image(image, &mut |_, _| {}, &mut |r| {
            all.extend_from_slice(r);
            Ok(())
        })
        .unwrap();
        all
    }

    fn write(sidecars: &Sidecars, image: &ImageFile) -> PathBuf {
        let digests = digests_of(image);
        let mut writer = sidecars.writer(image).unwrap();
        writer.push(&digests);
        writer
            .commit(&crate::records::fingerprint(image.size, &digests))
            .unwrap()
    }

    fn import(
        sidecars: &Sidecars,
        image: &ImageFile,
    ) -> std::result::Result<Vec<(u64, Digest)>, Refusal> {
        let mut all = Vec::new();
        sidecars.import(image, &mut |r| {
            assert_eq!(r.len() % RECORD, 0);
            all.extend(r.chunks_exact(RECORD).map(|r| {
                let block = u64::from_le_bytes(r[..8].try_into().unwrap());
                (block, <Digest>::try_from(&r[8..]).unwrap())
            }));
            Ok(())
        })?;
        Ok(all)
    }

    #[test]
    fn a_written_sidecar_imports_the_same_digests_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let image = image(dir.path(), &[0, 1, 2, 0, 0, 3, 1]);
        let sidecars = Sidecars::new(Mode::Write, None, None, 1.0)
            .unwrap()
            .unwrap();
        let path = write(&sidecars, &image);
        assert_eq!(path, dir.path().join(".img.raw.vmar-digests"));
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 2, "{names:?}");
        assert_eq!(import(&sidecars, &image).unwrap(), digests_of(&image));
    }

    #[test]
    fn a_lying_sidecar_is_caught_by_the_sample() {
        let dir = tempfile::tempdir().unwrap();
        let image = image(dir.path(), &[1, 2, 0, 4]);
        let sidecars = Sidecars::new(Mode::Write, None, None, 1.0)
            .unwrap()
            .unwrap();
        // Digests of other content, sealed correctly and bound to this image's identity.
        let mut lies = digests_of(&image);
        lies[1].1 = [7; 32];
        let mut writer = sidecars.writer(&image).unwrap();
        writer.push(&lies);
        writer
            .commit(&crate::records::fingerprint(image.size, &lies))
            .unwrap();
        assert_eq!(import(&sidecars, &image).unwrap_err().kind, "mismatch");
        // Claiming a data block is zero is a lie too.
        let mut writer = sidecars.writer(&image).unwrap();
        let fewer = vec![lies[0], lies[2]];
        writer.push(&fewer);
        writer
            .commit(&crate::records::fingerprint(image.size, &fewer))
            .unwrap();
        assert_eq!(import(&sidecars, &image).unwrap_err().kind, "mismatch");
        // With no sample nothing is read, and the lie goes through: why the default samples.
        let blind = Sidecars::new(Mode::Read, None, None, 0.0).unwrap().unwrap();
        assert!(import(&blind, &image).is_ok());
    }

    #[test]
    fn stale_untrusted_and_missing_sidecars_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let image = image(dir.path(), &[1, 2, 3]);
        let sidecars = Sidecars::new(Mode::Write, None, None, 0.0)
            .unwrap()
            .unwrap();
        assert_eq!(import(&sidecars, &image).unwrap_err().kind, "absent");
        let path = write(&sidecars, &image);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
        assert_eq!(import(&sidecars, &image).unwrap_err().kind, "untrusted");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(import(&sidecars, &image).is_ok());
        // A keyed host refuses it; one with the key accepts only sidecars sealed with it.
        let key = dir.path().join("fleet.key");
        std::fs::write(&key, [9u8; 32]).unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        let keyed = Sidecars::new(Mode::Write, None, Some(&key), 0.0)
            .unwrap()
            .unwrap();
        assert_eq!(import(&keyed, &image).unwrap_err().kind, "untrusted");
        write(&keyed, &image);
        assert!(import(&keyed, &image).is_ok());
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
        assert!(
            import(&keyed, &image).is_ok(),
            "keyed: ownership does not matter"
        );
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(Sidecars::new(Mode::Write, None, Some(&key), 0.0).is_err());
        // The image written after: stale (times), even when the mtime is put back.
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&image.path)
            .unwrap();
        let mtime = std::fs::metadata(&image.path).unwrap().modified().unwrap();
        f.write_all_at(&[5u8; 10], 0).unwrap();
        f.set_modified(mtime).unwrap();
        let changed = ImageFile::open(&image.path).unwrap();
        let refusal = import(&keyed, &changed).unwrap_err();
        assert_eq!(refusal.kind, "stale", "{refusal}");
        assert!(refusal.message.contains("change time"), "{refusal}");
    }

    #[test]
    fn decoding_in_batches_on_two_threads_hands_over_every_record_and_the_samples() {
        use format::{Encoder, Header, Seal};
        let blocks = 40_000u64;
        let records: Vec<(u64, Digest)> = (0..blocks)
            .filter(|b| b % 9 != 4 && !(1000..1300).contains(b))
            .map(|b| (b, *blake3::hash(&b.to_le_bytes()).as_bytes()))
            .collect();
        let header = Header {
            size: blocks * BLOCK_SIZE,
            mtime_ns: 1,
            ctime_ns: 2,
        };
        let mut encoder = Encoder::new(Vec::new(), &header, &Seal::Checksum).unwrap();
        encoder.push(&records).unwrap();
        let (bytes, fingerprint) = encoder.finish().unwrap();
        let samples = [0, 4, 5, 1100, 1300, 20_000, 39_999];
        let decode = |fail_at: Option<usize>| {
            let mut decoder = Decoder::new(bytes.as_slice(), &Seal::Checksum).unwrap();
            let mut got = Vec::new();
            let mut batches = 0;
            let expected = decode_all(&mut decoder, &samples, 1000, &mut |batch| {
                batches += 1;
                if Some(batches) == fail_at {
                    return Err(Error::internal("disk full"));
                }
                got.extend(batch.chunks_exact(RECORD).map(decode_record));
                Ok(())
            });
            (expected, got, batches, decoder.fingerprint())
        };
        let (expected, got, batches, decoded_fingerprint) = decode(None);
        assert_eq!(got, records);
        assert!(batches >= 30, "{batches} batches");
        assert_eq!(decoded_fingerprint, fingerprint);
        let digest_of = |b: u64| records.iter().find(|r| r.0 == b).map(|r| r.1);
        let want: Vec<Option<Digest>> = samples.iter().map(|&b| digest_of(b)).collect();
        assert_eq!(want.iter().filter(|d| d.is_none()).count(), 3);
        assert_eq!(expected.unwrap(), want);
        // A consumer that fails stops the reader, and its error is the answer.
        let (expected, _, batches, _) = decode(Some(3));
        assert_eq!(batches, 3);
        assert_eq!(expected.unwrap_err().kind, "io");
        // A damaged sidecar is refused, whatever the consumer took meanwhile.
        let mut damaged = bytes.clone();
        let at = damaged.len() / 2;
        damaged[at] ^= 1;
        let mut decoder = Decoder::new(damaged.as_slice(), &Seal::Checksum).unwrap();
        let refused = decode_all(&mut decoder, &samples, 1000, &mut |_| Ok(())).unwrap_err();
        assert!(
            ["untrusted", "corrupt"].contains(&refused.kind),
            "{refused}"
        );
    }

    #[test]
    fn a_sidecar_dir_holds_them_by_file_name() {
        let dir = tempfile::tempdir().unwrap();
        let side = dir.path().join("side");
        std::fs::create_dir(&side).unwrap();
        let sidecars = Sidecars::new(Mode::Write, Some(side.clone()), None, 0.5)
            .unwrap()
            .unwrap();
        let image = image(dir.path(), &[1, 0, 2]);
        assert_eq!(write(&sidecars, &image), side.join("img.raw.vmar-digests"));
        assert!(import(&sidecars, &image).is_ok());
        assert!(Sidecars::new(Mode::Off, None, None, 0.5).unwrap().is_none());
        assert!(Sidecars::new(Mode::Read, None, None, 1.5).is_err());
    }
}
