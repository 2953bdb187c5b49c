//! The oracle's reading and comparing (see the module above for what it reads).

use std::collections::BTreeMap;
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::time::Instant;

use nix::fcntl::{PosixFadviseAdvice, posix_fadvise};

use rayon::prelude::*;

use crate::catalog::Catalog;
use crate::error::{Error, Result};
use crate::image::{BLOCK_SIZE, ImageFile};
use crate::map::{ImageId, Source};
use crate::progress::Progress;
use crate::scan::{data_ranges, is_zero};
use crate::sys::{Residency, residency};
use crate::units::usize_of;

use super::{Mismatch, VerifyReport};

/// Blocks compared by one parallel task, and per progress step.
const PIECE_BLOCKS: u64 = 256;
const STEP_BLOCKS: u64 = 16 * 1024;

/// An open file verify reads, with what the page cache held of it when verify started.
struct Reader {
    image: ImageFile,
    /// `None` when mincore could not tell (then nothing is dropped, to never evict shared pages).
    cached: Option<Residency>,
}

impl Reader {
    fn open(image: ImageFile) -> Reader {
        let cached = match residency(&image.path, image.size) {
            // No readahead on this descriptor: it would cache pages beyond what is read,
            // which dropping the read range would leave behind.
            Ok(r) => match posix_fadvise(
                image.file.as_raw_fd(),
                0,
                0,
                PosixFadviseAdvice::POSIX_FADV_RANDOM,
            ) {
                Ok(()) => Some(r),
                Err(e) => {
                    tracing::warn!(
                        "cannot turn readahead off for {}: {e}",
                        image.path.display()
                    );
                    Some(r)
                }
            },
            Err(e) => {
                tracing::warn!("verify will not drop what it reads from the page cache: {e}");
                None
            }
        };
        Reader { image, cached }
    }

    /// Reads `buf.len()` bytes at `offset`, then drops from the page cache the pages of that
    /// range that were not cached when verify started. Returns the bytes dropped.
    fn read(&self, buf: &mut [u8], offset: u64) -> Result<u64> {
        read(&self.image, buf, offset)?;
        let Some(cached) = &self.cached else {
            return Ok(0);
        };
        let page = cached.page_size;
        let first = offset / page;
        let end = (offset + buf.len() as u64).div_ceil(page);
        let mut dropped = 0;
        let mut run: Option<Range<u64>> = None;
        for p in first..=end {
            let resident = p == end || cached.pages.get(usize_of(p)).is_none_or(|b| b & 1 == 1);
            match (&mut run, resident) {
                (Some(r), false) => r.end = p + 1,
                (None, false) => run = Some(p..p + 1),
                (Some(r), true) => {
                    dropped += self.drop_pages(r.clone(), page)?;
                    run = None;
                }
                (None, true) => {}
            }
        }
        Ok(dropped)
    }

    fn drop_pages(&self, pages: Range<u64>, page: u64) -> Result<u64> {
        let (offset, len) = (pages.start * page, (pages.end - pages.start) * page);
        posix_fadvise(
            self.image.file.as_raw_fd(),
            offset as i64,
            len as i64,
            PosixFadviseAdvice::POSIX_FADV_DONTNEED,
        )
        .map_err(|e| {
            Error::io(
                "cannot drop from the page cache",
                &self.image.path,
                e.into(),
            )
        })?;
        Ok(len.min(self.image.size.saturating_sub(offset)))
    }
}

/// One piece of an extent: `len` blocks at `start`, expected to equal `source` (never `Own`).
struct Piece {
    start: u64,
    len: u64,
    source: Source,
}

/// Cuts `blocks` (mapped to `source`, whose first block is `first`) into pieces of at most
/// `PIECE_BLOCKS`.
fn push_pieces(pieces: &mut Vec<Piece>, blocks: Range<u64>, source: Source, first: u64) {
    let mut start = blocks.start;
    while start < blocks.end {
        let len = PIECE_BLOCKS.min(blocks.end - start);
        let source = match source {
            Source::Redirect { image, block } => Source::Redirect {
                image,
                block: block + (start - first),
            },
            other => other,
        };
        pieces.push(Piece { start, len, source });
        start += len;
    }
}

/// Verifies image `name` against its map. Fails (rather than reporting a mismatch) when the
/// image or an image it redirects to changed since capture: the map is stale then.
pub fn verify(
    catalog: &Catalog,
    name: &str,
    progress: &mut dyn FnMut(Progress),
) -> Result<VerifyReport> {
    let started = Instant::now();
    let (record, map) = catalog.map(name)?;
    let image = crate::holds::open_captured(catalog, &record)?;
    let data = data_ranges(&image.file, record.size, &image.path)?;
    // Every image the map reads from: itself (redirects within the image) and the others.
    let mut others = BTreeMap::new();
    for (id, other) in catalog.sources_of(&record, &map)? {
        if id == record.id {
            continue;
        }
        let file = crate::holds::open_captured(catalog, &other)?;
        others.insert(id, (other.name, Reader::open(file)));
    }
    let sources = Sources {
        id: record.id,
        name: record.name.clone(),
        image: Reader::open(image),
        others,
    };

    let mut pieces = Vec::new();
    let mut data_iter = data.iter().peekable();
    for extent in &map.extents {
        match extent.source {
            // Own blocks are read from the image itself at the same offset: equal by
            // construction.
            Source::Own => {}
            // Holes read as zeros: only the data ranges inside a zero extent are read.
            Source::Zero => {
                while data_iter.next_if(|r| r.end <= extent.start).is_some() {}
                for range in data_iter.clone() {
                    if range.start >= extent.end() {
                        break;
                    }
                    let part = range.start.max(extent.start)..range.end.min(extent.end());
                    push_pieces(&mut pieces, part, Source::Zero, extent.start);
                }
            }
            Source::Redirect { .. } => push_pieces(
                &mut pieces,
                extent.start..extent.end(),
                extent.source,
                extent.start,
            ),
        }
    }

    let size = record.size;
    let total_blocks = map.blocks;
    let mut bytes_read = 0;
    let mut bytes_dropped = 0;
    progress(Progress {
        done: 0,
        total: size,
    });
    let report = |ok, mismatch, bytes_read, bytes_dropped| VerifyReport {
        name: record.name.clone(),
        blocks: total_blocks,
        bytes_compared: size,
        ok,
        mismatch,
        bytes_read,
        bytes_dropped,
        micros: u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX),
    };
    for step in pieces.chunk_by(|a, b| a.start / STEP_BLOCKS == b.start / STEP_BLOCKS) {
        let outcomes: Vec<Result<Checked>> = step
            .par_iter()
            .map_init(
                || {
                    let buf = vec![0u8; usize_of(PIECE_BLOCKS * BLOCK_SIZE)];
                    (buf.clone(), buf)
                },
                |(mine, theirs), piece| check_piece(piece, size, &sources, mine, theirs),
            )
            .collect();
        for outcome in outcomes {
            let checked = outcome?;
            bytes_read += checked.bytes_read;
            bytes_dropped += checked.bytes_dropped;
            if let Some(mismatch) = checked.mismatch {
                let mut failed = report(false, Some(mismatch), bytes_read, bytes_dropped);
                failed.bytes_compared = failed.mismatch.as_ref().map_or(0, |m| m.offset);
                return Ok(failed);
            }
        }
        let end = step.last().map_or(0, |p| p.start + p.len);
        progress(Progress {
            done: (end * BLOCK_SIZE).min(size),
            total: size,
        });
    }
    progress(Progress {
        done: size,
        total: size,
    });
    Ok(report(true, None, bytes_read, bytes_dropped))
}

fn read(file: &ImageFile, buf: &mut [u8], offset: u64) -> Result<()> {
    file.file.read_exact_at(buf, offset).map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            Error::ChangedDuringCapture {
                path: file.path.clone(),
                what: "it is shorter than its map".into(),
            }
        } else {
            Error::io("cannot read", &file.path, e)
        }
    })
}

/// The image being verified and the images its map redirects to.
struct Sources {
    id: ImageId,
    name: String,
    image: Reader,
    others: BTreeMap<ImageId, (String, Reader)>,
}

impl Sources {
    fn get(&self, id: ImageId) -> Result<(&str, &Reader)> {
        if id == self.id {
            return Ok((&self.name, &self.image));
        }
        self.others
            .get(&id)
            .map(|(name, reader)| (name.as_str(), reader))
            .ok_or_else(|| Error::Catalog {
                dir: self.image.image.path.clone(),
                message: format!("map redirects to image {id}, which it does not reference"),
            })
    }
}

/// What checking one piece found and cost.
struct Checked {
    mismatch: Option<Mismatch>,
    bytes_read: u64,
    bytes_dropped: u64,
}

/// Compares one piece; returns the mismatch if any.
fn check_piece(
    piece: &Piece,
    size: u64,
    sources: &Sources,
    mine: &mut [u8],
    theirs: &mut [u8],
) -> Result<Checked> {
    let offset = piece.start * BLOCK_SIZE;
    let len = usize_of(((piece.start + piece.len) * BLOCK_SIZE).min(size) - offset);
    let mine = &mut mine[..len];
    let theirs = &mut theirs[..len];
    let mut bytes_read = len as u64;
    let mut bytes_dropped = sources.image.read(mine, offset)?;
    let mut source_image = None;
    let differs_at = match piece.source {
        Source::Own => None,
        Source::Zero => {
            if is_zero(mine) {
                None
            } else {
                mine.iter().position(|&b| b != 0)
            }
        }
        Source::Redirect { image: id, block } => {
            let (name, from) = sources.get(id)?;
            source_image = Some(name.to_string());
            bytes_read += len as u64;
            bytes_dropped += from.read(theirs, block * BLOCK_SIZE)?;
            if mine == theirs {
                None
            } else {
                mine.iter().zip(theirs.iter()).position(|(a, b)| a != b)
            }
        }
    };
    let mismatch = differs_at.map(|at| {
        let at = offset + at as u64;
        let block = at / BLOCK_SIZE;
        // The source of that very block, not of the piece's first.
        let source = match piece.source {
            Source::Redirect {
                image,
                block: first,
            } => Source::Redirect {
                image,
                block: first + (block - piece.start),
            },
            other => other,
        };
        Mismatch {
            block,
            offset: at,
            source,
            source_image,
        }
    });
    Ok(Checked {
        mismatch,
        bytes_read,
        bytes_dropped,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::residency;
    use std::fs::File;
    use std::io::Read;
    use std::os::unix::fs::FileExt;
    use std::path::{Path, PathBuf};

    const B: usize = usize_of(BLOCK_SIZE);

    fn pattern(seed: u8) -> Vec<u8> {
        (0..B)
            .map(|i| (i.to_le_bytes()[0]).wrapping_mul(31) ^ seed)
            .collect()
    }

    /// Blocks 0..4 unique, 4..8 written zeros, 8..1024 a hole, 1024..1028 copies of 0..4.
    fn image(dir: &Path) -> (PathBuf, Catalog) {
        let path = dir.join("img.raw");
        let file = File::create(&path).unwrap();
        for i in 0..4u64 {
            file.write_all_at(&pattern(i.to_le_bytes()[0] + 1), i * BLOCK_SIZE)
                .unwrap();
            file.write_all_at(&pattern(i.to_le_bytes()[0] + 1), (1024 + i) * BLOCK_SIZE)
                .unwrap();
        }
        file.write_all_at(&vec![0u8; 4 * B], 4 * BLOCK_SIZE)
            .unwrap();
        file.sync_all().unwrap();
        let catalog = Catalog::open(&dir.join("state")).unwrap();
        let image = ImageFile::open(&path).unwrap();
        catalog.capture(&image, None, false, &mut |_| {}).unwrap();
        (path, catalog)
    }

    fn drop_cache(path: &Path) {
        let file = File::open(path).unwrap();
        posix_fadvise(
            file.as_raw_fd(),
            0,
            0,
            PosixFadviseAdvice::POSIX_FADV_DONTNEED,
        )
        .unwrap();
    }

    #[test]
    fn reads_only_written_zeros_and_redirects_and_leaves_the_cache_as_it_was() {
        let dir = tempfile::tempdir().unwrap();
        let (path, catalog) = image(dir.path());
        let size = 1028 * BLOCK_SIZE;

        // Cold: everything verify reads is dropped again.
        drop_cache(&path);
        let report = verify(&catalog, "img", &mut |_| {}).unwrap();
        assert!(report.ok, "{report:?}");
        // 4 written zero blocks, 4 redirected blocks and the 4 they redirect to.
        assert_eq!(report.bytes_read, 12 * BLOCK_SIZE);
        assert_eq!(report.bytes_dropped, 12 * BLOCK_SIZE);
        assert_eq!(report.bytes_compared, size);
        assert_eq!(residency(&path, size).unwrap().cached_bytes(), 0);

        // Hot: nothing was dropped, the cache holds what it held.
        let mut all = Vec::new();
        File::open(&path).unwrap().read_to_end(&mut all).unwrap();
        let before = residency(&path, size).unwrap();
        let report = verify(&catalog, "img", &mut |_| {}).unwrap();
        assert!(report.ok);
        assert_eq!(report.bytes_read, 12 * BLOCK_SIZE);
        assert_eq!(report.bytes_dropped, 0);
        assert_eq!(residency(&path, size).unwrap(), before);
    }

    /// Writes `data` at `block` while keeping the file's identity (size, inode, mtime), as a
    /// restored backup or a careless tool would: verify must still see it.
    fn tamper(path: &Path, block: u64, data: &[u8]) {
        let file = File::options().write(true).open(path).unwrap();
        let mtime = file.metadata().unwrap().modified().unwrap();
        file.write_all_at(data, block * BLOCK_SIZE).unwrap();
        file.set_modified(mtime).unwrap();
        file.sync_all().unwrap();
    }

    /// The image's inode change time gives such a write away before verify reads anything
    /// (see `image::ImageIdentity`): make the catalog accept the file as it is now, so that
    /// verify's own comparison is what is tested.
    fn trust(catalog: &Catalog, path: &Path) {
        let err = verify(catalog, "img", &mut |_| {}).unwrap_err();
        assert_eq!(err.kind(), "image-changed", "{err}");
        let identity = ImageFile::open(path).unwrap().identity;
        catalog.replace_identity("img", identity).unwrap();
    }

    #[test]
    fn finds_data_written_where_zeros_and_holes_were() {
        for (block, at) in [(6u64, 100usize), (500, 0)] {
            let dir = tempfile::tempdir().unwrap();
            let (path, catalog) = image(dir.path());
            let mut data = vec![0u8; B];
            data[at] = 0xFF;
            tamper(&path, block, &data);
            trust(&catalog, &path);
            let report = verify(&catalog, "img", &mut |_| {}).unwrap();
            assert!(!report.ok, "block {block}");
            let mismatch = report.mismatch.unwrap();
            assert_eq!(mismatch.block, block);
            assert_eq!(mismatch.offset, block * BLOCK_SIZE + at as u64);
            assert_eq!(mismatch.source, Source::Zero);
        }
    }

    #[test]
    fn finds_a_redirect_whose_copies_differ() {
        let dir = tempfile::tempdir().unwrap();
        let (path, catalog) = image(dir.path());
        let mut data = pattern(3);
        data[7] ^= 1;
        tamper(&path, 1026, &data);
        trust(&catalog, &path);
        let report = verify(&catalog, "img", &mut |_| {}).unwrap();
        let mismatch = report.mismatch.unwrap();
        assert_eq!(mismatch.offset, 1026 * BLOCK_SIZE + 7);
        assert_eq!(mismatch.source_image.as_deref(), Some("img"));
        assert!(matches!(mismatch.source, Source::Redirect { block: 2, .. }));
    }
}
