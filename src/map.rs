//! Block translation maps: for each block of an image, where its content is served from.
//! A map is a sorted list of extents covering the image; adjacent extents that continue each
//! other are merged, so a copy of a whole file is one extent. Pure logic, no I/O.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::image::BLOCK_SIZE;

/// Catalog id of a captured image; ids grow in capture order.
pub type ImageId = u32;

/// Where the content of a run of blocks comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Source {
    /// All zero: served without I/O.
    Zero,
    /// The image's own blocks, at the same offset.
    Own,
    /// The canonical copy: `image`'s blocks starting at `block`.
    Redirect { image: ImageId, block: u64 },
}

/// A run of `len` blocks of an image starting at `start`, all served from `source`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Extent {
    pub start: u64,
    pub len: u64,
    #[serde(flatten)]
    pub source: Source,
}

impl Extent {
    pub fn end(&self) -> u64 {
        self.start + self.len
    }

    /// True when `source` placed at block `self.end()` continues this extent.
    fn continued_by(&self, source: Source) -> bool {
        match (self.source, source) {
            (Source::Zero, Source::Zero) | (Source::Own, Source::Own) => true,
            (Source::Redirect { image, block }, Source::Redirect { image: i, block: b }) => {
                image == i && block + self.len == b
            }
            _ => false,
        }
    }
}

/// The translation map of one image.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockMap {
    pub image: ImageId,
    /// Blocks in the image (the last one may be partial).
    pub blocks: u64,
    pub extents: Vec<Extent>,
}

/// Figures of a map, as reported by `vmarctl map`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MapSummary {
    pub blocks: u64,
    pub zero_blocks: u64,
    pub own_blocks: u64,
    pub redirected_blocks: u64,
    /// Redirected blocks whose canonical copy is in another image (the rest point to an
    /// earlier block of the same image).
    pub redirected_to_other_images: u64,
    pub extents: u64,
    /// Bytes served from a canonical copy elsewhere instead of the image itself.
    pub bytes_shared: u64,
}

impl BlockMap {
    /// Source of one block, or None outside the image.
    pub fn source_of(&self, block: u64) -> Option<Source> {
        let index = self.extents.partition_point(|e| e.end() <= block);
        let extent = self.extents.get(index)?;
        (extent.start <= block).then(|| match extent.source {
            Source::Redirect { image, block: b } => Source::Redirect {
                image,
                block: b + (block - extent.start),
            },
            other => other,
        })
    }

    /// Counts blocks by source. `size` is the image size in bytes, for the partial last block.
    pub fn summary(&self, size: u64) -> MapSummary {
        let mut s = MapSummary {
            blocks: self.blocks,
            extents: self.extents.len() as u64,
            ..MapSummary::default()
        };
        for e in &self.extents {
            match e.source {
                Source::Zero => s.zero_blocks += e.len,
                Source::Own => s.own_blocks += e.len,
                Source::Redirect { image, .. } => {
                    s.redirected_blocks += e.len;
                    if image != self.image {
                        s.redirected_to_other_images += e.len;
                    }
                    s.bytes_shared += (e.end() * BLOCK_SIZE).min(size) - e.start * BLOCK_SIZE;
                }
            }
        }
        s
    }

    /// Blocks redirected to each other image, by image id.
    pub fn redirects_by_image(&self) -> BTreeMap<ImageId, u64> {
        let mut by_image = BTreeMap::new();
        for e in &self.extents {
            if let Source::Redirect { image, .. } = e.source
                && image != self.image
            {
                *by_image.entry(image).or_insert(0) += e.len;
            }
        }
        by_image
    }

    /// Whether any extent reads the image itself (a copy of other images reads none of it,
    /// and its device needs no loop device of its own).
    pub fn reads_own(&self) -> bool {
        self.extents.iter().any(|e| match e.source {
            Source::Own => true,
            Source::Redirect { image, .. } => image == self.image,
            Source::Zero => false,
        })
    }

    /// Ids of the other images this map reads from, sorted.
    pub fn referenced_images(&self) -> Vec<ImageId> {
        let mut ids: Vec<ImageId> = self
            .extents
            .iter()
            .filter_map(|e| match e.source {
                Source::Redirect { image, .. } if image != self.image => Some(image),
                _ => None,
            })
            .collect();
        ids.sort_unstable();
        ids.dedup();
        ids
    }
}

/// Builds a map block by block, in order, merging runs as they come.
#[derive(Debug)]
pub struct MapBuilder {
    map: BlockMap,
    next: u64,
}

impl MapBuilder {
    pub fn new(image: ImageId, blocks: u64) -> MapBuilder {
        MapBuilder {
            map: BlockMap {
                image,
                blocks,
                extents: Vec::new(),
            },
            next: 0,
        }
    }

    /// Appends `len` blocks served from `source` (a redirect names its first block). Blocks
    /// skipped since the last push are zero. Blocks must come in increasing order.
    pub fn push(&mut self, start: u64, len: u64, source: Source) {
        debug_assert!(start >= self.next, "blocks out of order");
        if start > self.next {
            self.append(self.next, start - self.next, Source::Zero);
        }
        // A redirect to the very same block is the block itself.
        let source = match source {
            Source::Redirect { image, block } if image == self.map.image && block == start => {
                Source::Own
            }
            other => other,
        };
        self.append(start, len, source);
    }

    fn append(&mut self, start: u64, len: u64, source: Source) {
        if len == 0 {
            return;
        }
        self.next = start + len;
        if let Some(last) = self.map.extents.last_mut()
            && last.end() == start
            && last.continued_by(source)
        {
            last.len += len;
            return;
        }
        self.map.extents.push(Extent { start, len, source });
    }

    /// Fills the rest of the image with zero and returns the map.
    pub fn finish(mut self) -> BlockMap {
        if self.next < self.map.blocks {
            self.append(self.next, self.map.blocks - self.next, Source::Zero);
        }
        self.map
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn redirect(image: ImageId, block: u64) -> Source {
        Source::Redirect { image, block }
    }

    #[test]
    fn adjacent_runs_merge() {
        let mut b = MapBuilder::new(2, 20);
        b.push(0, 1, Source::Own);
        b.push(1, 1, Source::Own);
        b.push(2, 1, redirect(0, 7));
        b.push(3, 1, redirect(0, 8)); // continues the redirect
        b.push(4, 1, redirect(0, 8)); // same source block again: not a continuation
        b.push(5, 1, redirect(1, 9)); // other image
        b.push(9, 1, Source::Own); // 6..9 zero
        b.push(10, 1, redirect(2, 10)); // itself: own, merges
        let map = b.finish(); // 11..20 zero
        let got: Vec<(u64, u64, Source)> = map
            .extents
            .iter()
            .map(|e| (e.start, e.len, e.source))
            .collect();
        assert_eq!(
            got,
            vec![
                (0, 2, Source::Own),
                (2, 2, redirect(0, 7)),
                (4, 1, redirect(0, 8)),
                (5, 1, redirect(1, 9)),
                (6, 3, Source::Zero),
                (9, 2, Source::Own),
                (11, 9, Source::Zero),
            ]
        );
        assert_eq!(map.source_of(3), Some(redirect(0, 8)));
        assert_eq!(map.source_of(7), Some(Source::Zero));
        assert_eq!(map.source_of(20), None);
        assert_eq!(map.referenced_images(), vec![0, 1]);
    }

    #[test]
    fn summary_counts_every_block_once() {
        let mut b = MapBuilder::new(1, 10);
        b.push(0, 3, redirect(0, 0));
        b.push(3, 1, redirect(1, 0)); // within the same image
        b.push(5, 5, Source::Own);
        let map = b.finish();
        // Last block is partial: image is 9 blocks + 512 bytes.
        let s = map.summary(9 * BLOCK_SIZE + 512);
        assert_eq!(s.blocks, 10);
        assert_eq!(s.zero_blocks + s.own_blocks + s.redirected_blocks, 10);
        assert_eq!(
            (s.zero_blocks, s.own_blocks, s.redirected_blocks),
            (1, 5, 4)
        );
        assert_eq!(s.redirected_to_other_images, 3);
        assert_eq!(s.bytes_shared, 4 * BLOCK_SIZE);
        assert_eq!(s.extents, 4);
    }

    #[test]
    fn empty_and_all_zero_maps() {
        let map = MapBuilder::new(0, 0).finish();
        assert!(map.extents.is_empty());
        let map = MapBuilder::new(0, 5).finish();
        assert_eq!(
            map.extents,
            vec![Extent {
                start: 0,
                len: 5,
                source: Source::Zero
            }]
        );
    }
}
