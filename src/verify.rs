//! The correctness oracle: reads every block of an image through its map, from the canonical
//! copies, and proves it equals the image itself. Used by tests and by operators before they
//! trust a map with a VM.

use std::collections::BTreeMap;
use std::os::unix::fs::FileExt;

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::catalog::Catalog;
use crate::error::{Error, Result};
use crate::image::{BLOCK_SIZE, ImageFile, open_unchanged};
use crate::map::{ImageId, Source};
use crate::protocol::Progress;
use crate::scan::is_zero;

/// Blocks compared by one parallel task, and per progress step.
const PIECE_BLOCKS: u64 = 256;
const STEP_BLOCKS: u64 = 16 * 1024;

/// The first block whose mapped content differs from the image.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mismatch {
    pub block: u64,
    /// Byte offset of the first differing byte in the image.
    pub offset: u64,
    pub source: Source,
    /// Name of the image the block was read from (for redirects).
    pub source_image: Option<String>,
}

/// Outcome of a verification.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifyReport {
    pub name: String,
    pub blocks: u64,
    pub bytes_compared: u64,
    pub ok: bool,
    pub mismatch: Option<Mismatch>,
}

/// One piece of an extent: `len` blocks at `start`, expected to equal `source`.
struct Piece {
    start: u64,
    len: u64,
    source: Source,
}

/// Verifies image `name` against its map. Fails (rather than reporting a mismatch) when the
/// image or an image it redirects to changed since capture: the map is stale then.
pub fn verify(
    catalog: &Catalog,
    name: &str,
    progress: &mut dyn FnMut(Progress),
) -> Result<VerifyReport> {
    let (record, map) = catalog.map(name)?;
    let image = open_unchanged(&record.name, &record.path, &record.identity)?;
    // Every image the map reads from, including itself (redirects within the image).
    let mut sources: BTreeMap<ImageId, (String, ImageFile)> = BTreeMap::new();
    sources.insert(
        record.id,
        (
            record.name.clone(),
            open_unchanged(&record.name, &record.path, &record.identity)?,
        ),
    );
    for id in map.referenced_images() {
        let other = catalog.image_by_id(id)?;
        let file = open_unchanged(&other.name, &other.path, &other.identity)?;
        sources.insert(id, (other.name, file));
    }

    let mut pieces = Vec::new();
    for extent in &map.extents {
        let mut start = extent.start;
        while start < extent.end() {
            let len = PIECE_BLOCKS.min(extent.end() - start);
            let source = match extent.source {
                Source::Redirect { image, block } => Source::Redirect {
                    image,
                    block: block + (start - extent.start),
                },
                other => other,
            };
            pieces.push(Piece { start, len, source });
            start += len;
        }
    }

    let size = record.size;
    let total_blocks = map.blocks;
    let mut done_blocks = 0;
    let mut bytes_compared = 0;
    progress(Progress {
        done: 0,
        total: size,
    });
    for step in pieces.chunk_by(|a, b| a.start / STEP_BLOCKS == b.start / STEP_BLOCKS) {
        let found = step
            .par_iter()
            .map_init(
                || {
                    let buf = vec![0u8; (PIECE_BLOCKS * BLOCK_SIZE) as usize];
                    (buf.clone(), buf)
                },
                |(mine, theirs), piece| check_piece(piece, size, &image, &sources, mine, theirs),
            )
            .find_map_first(|outcome| match outcome {
                Ok(None) => None,
                other => Some(other),
            });
        match found {
            Some(Err(e)) => return Err(e),
            Some(Ok(mismatch)) => {
                return Ok(VerifyReport {
                    name: record.name,
                    blocks: total_blocks,
                    bytes_compared,
                    ok: false,
                    mismatch,
                });
            }
            None => {}
        }
        for piece in step {
            done_blocks += piece.len;
            bytes_compared +=
                (piece.start + piece.len).min(total_blocks) * BLOCK_SIZE - piece.start * BLOCK_SIZE;
        }
        progress(Progress {
            done: (done_blocks * BLOCK_SIZE).min(size),
            total: size,
        });
    }
    Ok(VerifyReport {
        name: record.name,
        blocks: total_blocks,
        bytes_compared: bytes_compared.min(size),
        ok: true,
        mismatch: None,
    })
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

/// Compares one piece; returns the mismatch if any.
fn check_piece(
    piece: &Piece,
    size: u64,
    image: &ImageFile,
    sources: &BTreeMap<ImageId, (String, ImageFile)>,
    mine: &mut [u8],
    theirs: &mut [u8],
) -> Result<Option<Mismatch>> {
    let offset = piece.start * BLOCK_SIZE;
    let len = (((piece.start + piece.len) * BLOCK_SIZE).min(size) - offset) as usize;
    let mine = &mut mine[..len];
    let theirs = &mut theirs[..len];
    let differs_at = match piece.source {
        // Own blocks are read from the image itself at the same offset: equal by construction.
        Source::Own => return Ok(None),
        Source::Zero => {
            read(image, mine, offset)?;
            if is_zero(mine) {
                None
            } else {
                mine.iter().position(|&b| b != 0)
            }
        }
        Source::Redirect { image: id, block } => {
            read(image, mine, offset)?;
            let (_, from) = sources.get(&id).ok_or_else(|| Error::Catalog {
                dir: image.path.clone(),
                message: format!("map redirects to image {id}, which it does not reference"),
            })?;
            read(from, theirs, block * BLOCK_SIZE)?;
            if mine == theirs {
                None
            } else {
                mine.iter().zip(theirs.iter()).position(|(a, b)| a != b)
            }
        }
    };
    Ok(differs_at.map(|at| {
        let at = offset + at as u64;
        Mismatch {
            block: at / BLOCK_SIZE,
            offset: at,
            source: piece.source,
            source_image: match piece.source {
                Source::Redirect { image, .. } => sources.get(&image).map(|(n, _)| n.clone()),
                _ => None,
            },
        }
    }))
}
