//! Device-mapper tables: a map turned into `linear` and `zero` targets in 512-byte sectors.
//! Pure and deterministic; the device path loads exactly what this produces.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::image::{BLOCK_SIZE, SECTOR_SIZE};
use crate::map::{BlockMap, ImageId, Source};

const SECTORS_PER_BLOCK: u64 = BLOCK_SIZE / SECTOR_SIZE;

/// What a target does.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum TargetKind {
    /// Reads return zeros; no I/O.
    Zero,
    /// Reads go to `device` starting at sector `offset`.
    Linear { device: String, offset: u64 },
}

/// One line of a table: `len` sectors starting at sector `start` of the mapped device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Target {
    pub start: u64,
    pub len: u64,
    #[serde(flatten)]
    pub kind: TargetKind,
}

impl Target {
    /// Target type name as the kernel knows it.
    pub fn target_type(&self) -> &'static str {
        match self.kind {
            TargetKind::Zero => "zero",
            TargetKind::Linear { .. } => "linear",
        }
    }

    /// Target parameters as the kernel takes them.
    pub fn params(&self) -> String {
        match &self.kind {
            TargetKind::Zero => String::new(),
            TargetKind::Linear { device, offset } => format!("{device} {offset}"),
        }
    }
}

/// Builds the table of an image of `size` bytes from its map. `device_of` names the block
/// device that serves an image's own blocks (its loop device, or a placeholder). Adjacent
/// targets that continue each other are merged, and the last target ends at the image's
/// last sector even when its last block is partial.
pub fn build(map: &BlockMap, size: u64, device_of: impl Fn(ImageId) -> String) -> Vec<Target> {
    let total = size / SECTOR_SIZE;
    let mut targets: Vec<Target> = Vec::with_capacity(map.extents.len());
    for extent in &map.extents {
        let start = extent.start * SECTORS_PER_BLOCK;
        if start >= total {
            break;
        }
        let len = (extent.end() * SECTORS_PER_BLOCK).min(total) - start;
        let kind = match extent.source {
            Source::Zero => TargetKind::Zero,
            Source::Own => TargetKind::Linear {
                device: device_of(map.image),
                offset: start,
            },
            Source::Redirect { image, block } => TargetKind::Linear {
                device: device_of(image),
                offset: block * SECTORS_PER_BLOCK,
            },
        };
        if let Some(last) = targets.last_mut()
            && continues(last, &kind)
        {
            last.len += len;
            continue;
        }
        targets.push(Target { start, len, kind });
    }
    targets
}

fn continues(last: &Target, kind: &TargetKind) -> bool {
    match (&last.kind, kind) {
        (TargetKind::Zero, TargetKind::Zero) => true,
        (
            TargetKind::Linear { device, offset },
            TargetKind::Linear {
                device: d,
                offset: o,
            },
        ) => device == d && offset + last.len == *o,
        _ => false,
    }
}

/// The table as `dmsetup table` prints it: one `start len type params` line per target.
pub fn to_text(targets: &[Target]) -> String {
    let mut text = String::new();
    for t in targets {
        let _ = write!(text, "{} {} {}", t.start, t.len, t.target_type());
        if let TargetKind::Linear { device, offset } = &t.kind {
            let _ = write!(text, " {device} {offset}");
        }
        text.push('\n');
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::map::MapBuilder;

    fn dev(id: ImageId) -> String {
        format!("/dev/loop{id}")
    }

    #[test]
    fn table_text_is_exact() {
        let mut b = MapBuilder::new(1, 6);
        b.push(0, 2, Source::Own);
        b.push(2, 1, Source::Redirect { image: 0, block: 5 });
        b.push(4, 2, Source::Own);
        let map = b.finish();
        let table = build(&map, 6 * BLOCK_SIZE, dev);
        assert_eq!(
            to_text(&table),
            "0 16 linear /dev/loop1 0\n\
             16 8 linear /dev/loop0 40\n\
             24 8 zero\n\
             32 16 linear /dev/loop1 32\n"
        );
        // Targets tile the device.
        assert_eq!(table.iter().map(|t| t.len).sum::<u64>(), 48);
        assert!(
            table
                .windows(2)
                .all(|w| w[0].start + w[0].len == w[1].start)
        );
    }

    #[test]
    fn partial_last_block_is_clamped() {
        let mut b = MapBuilder::new(0, 3);
        b.push(0, 3, Source::Own);
        let map = b.finish();
        let table = build(&map, 2 * BLOCK_SIZE + 1024, dev);
        assert_eq!(to_text(&table), "0 18 linear /dev/loop0 0\n");
    }

    #[test]
    fn same_device_continuations_merge() {
        // A redirect into the image itself that happens to continue its own run.
        let map = BlockMap {
            image: 3,
            blocks: 4,
            extents: vec![
                crate::map::Extent {
                    start: 0,
                    len: 2,
                    source: Source::Own,
                },
                crate::map::Extent {
                    start: 2,
                    len: 2,
                    source: Source::Redirect { image: 3, block: 2 },
                },
            ],
        };
        let table = build(&map, 4 * BLOCK_SIZE, dev);
        assert_eq!(table.len(), 1);
        assert_eq!(table[0].params(), "/dev/loop3 0");
        assert_eq!(table[0].target_type(), "linear");
    }

    #[test]
    fn tables_are_deterministic() {
        let mut b = MapBuilder::new(2, 100);
        for i in (0..100).step_by(3) {
            b.push(
                i,
                1,
                Source::Redirect {
                    image: 1,
                    block: i * 7,
                },
            );
        }
        let map = b.finish();
        let a = to_text(&build(&map, 100 * BLOCK_SIZE, dev));
        let b = to_text(&build(&map.clone(), 100 * BLOCK_SIZE, dev));
        assert_eq!(a, b);
    }
}
