//! What a device's reads cost, and how much the page cache shares: pure arithmetic over a
//! live table, the kernel's dm-stats counters and the resident pages of image files. The
//! kernel side (dm-stats messages, `mincore`) is behind [`crate::kernel`].
//!
//! dm-stats counts reads per *area* of a region; vmar keeps one region over each device,
//! split into at most [`MAX_STATS_AREAS`] equal areas so its kernel memory stays bounded.
//! Reads of an area that lies in extents of one class are attributed exactly; reads of an
//! area that mixes classes are split in proportion to the sectors of each class, and counted
//! in `estimated` so the operator sees how much of the split is a share, not a count.

use serde::{Deserialize, Serialize};

use crate::image::{BLOCK_SIZE, SECTOR_SIZE};
use crate::kernel::AreaReads;
use crate::table::{BlockDev, Target, TargetKind};
use crate::units::{Sectors, usize_of};

/// Most dm-stats areas of one device. Each area costs the kernel about 120 bytes plus 104
/// bytes per possible CPU; 4096 areas are ~1.3 MiB on a 2-CPU host, ~28 MiB on 64 CPUs.
pub const MAX_STATS_AREAS: u64 = 4096;

/// dm-stats `program_id` of vmar's regions, so other users' regions are left alone.
pub const STATS_PROGRAM: &str = "vmar";

/// Which kind of extent serves a sector of a device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    /// Read from the device's own image at the same offset.
    Own,
    /// Read from the canonical copy elsewhere (another image, or elsewhere in this one).
    Redirected,
    /// Served as zeros without I/O.
    Zero,
    /// Reads fail (`error` targets: an image changed under the device and vmar failed it
    /// closed).
    Error,
    /// A target type vmar does not load (someone else's table): counted, never as zeros.
    Other,
}

/// Bytes per class of extent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClassBytes {
    pub own: u64,
    pub redirected: u64,
    pub zero: u64,
    #[serde(default)]
    pub error: u64,
    #[serde(default)]
    pub other: u64,
}

impl ClassBytes {
    pub fn total(&self) -> u64 {
        self.own + self.redirected + self.zero + self.error + self.other
    }

    fn add(&mut self, class: Class, bytes: u64) {
        match class {
            Class::Own => self.own += bytes,
            Class::Redirected => self.redirected += bytes,
            Class::Zero => self.zero += bytes,
            Class::Error => self.error += bytes,
            Class::Other => self.other += bytes,
        }
    }

    /// Adds `other` to these.
    pub fn accumulate(&mut self, other: &ClassBytes) {
        self.own += other.own;
        self.redirected += other.redirected;
        self.zero += other.zero;
        self.error += other.error;
        self.other += other.other;
    }
}

/// Targets of a live table by class of extent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TargetCounts {
    pub own: u64,
    pub redirected: u64,
    pub zero: u64,
    #[serde(default)]
    pub error: u64,
    #[serde(default)]
    pub other: u64,
}

impl TargetCounts {
    /// Counts the targets of `mapped` by class.
    pub fn of(mapped: &[Mapped]) -> TargetCounts {
        let mut counts = TargetCounts::default();
        for m in mapped {
            match m.class {
                Class::Own => counts.own += 1,
                Class::Redirected => counts.redirected += 1,
                Class::Zero => counts.zero += 1,
                Class::Error => counts.error += 1,
                Class::Other => counts.other += 1,
            }
        }
        counts
    }

    /// Adds `other` to these.
    pub fn accumulate(&mut self, other: &TargetCounts) {
        self.own += other.own;
        self.redirected += other.redirected;
        self.zero += other.zero;
        self.error += other.error;
        self.other += other.other;
    }
}

/// A live target by class: the sectors it maps and where it reads from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mapped {
    pub start: Sectors,
    pub len: Sectors,
    pub class: Class,
    /// Device and first sector read, for `linear` targets.
    pub source: Option<(BlockDev, Sectors)>,
}

/// Classifies the targets of a live table. `own_device` is the `MAJOR:MINOR` of the loop
/// device of the device's own image: a `linear` target reading it at its own offset is
/// own, every other `linear` target is a redirection; `zero`, `error` (extents of an image
/// that changed under the device) and any other target type are each their own class.
pub fn classify(table: &[Target], own_device: Option<&BlockDev>) -> Vec<Mapped> {
    table
        .iter()
        .map(|t| {
            let source = t
                .linear_source()
                .map(|(device, offset)| (device.clone(), offset));
            let class = match (&source, &t.kind) {
                (None, TargetKind::Zero) => Class::Zero,
                (None, TargetKind::Error) => Class::Error,
                (None, _) => Class::Other,
                (Some((device, offset)), _) if Some(device) == own_device && *offset == t.start => {
                    Class::Own
                }
                (Some(_), _) => Class::Redirected,
            };
            Mapped {
                start: t.start,
                len: t.len,
                class,
                source,
            }
        })
        .collect()
}

/// Bytes of the device each class maps.
pub fn layout(mapped: &[Mapped]) -> ClassBytes {
    let mut bytes = ClassBytes::default();
    for m in mapped {
        bytes.add(m.class, m.len.bytes());
    }
    bytes
}

/// Area size in sectors for a dm-stats region over `sectors` sectors: a whole number of
/// blocks, with at most [`MAX_STATS_AREAS`] areas.
pub fn area_sectors(sectors: u64) -> u64 {
    let per_block = BLOCK_SIZE / SECTOR_SIZE;
    let blocks = sectors.div_ceil(per_block).max(1);
    blocks.div_ceil(MAX_STATS_AREAS) * per_block
}

/// Bytes read from a device, by class of extent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReadBytes {
    /// All bytes read, as the kernel counted them.
    pub total: u64,
    /// `total` by class.
    pub by_class: ClassBytes,
    /// Bytes of `by_class` split by share, read in areas that mix classes.
    pub estimated: u64,
}

impl ReadBytes {
    /// Adds `other` to these.
    pub fn accumulate(&mut self, other: &ReadBytes) {
        self.total += other.total;
        self.by_class.accumulate(&other.by_class);
        self.estimated += other.estimated;
    }
}

/// Attributes the reads of each area to the classes of the extents under it (`mapped`
/// sorted by start, as tables are).
pub fn attribute(mapped: &[Mapped], areas: &[AreaReads]) -> ReadBytes {
    let mut result = ReadBytes::default();
    let mut first = 0;
    for area in areas {
        if area.sectors_read == 0 {
            continue;
        }
        let bytes = area.sectors_read * SECTOR_SIZE;
        result.total += bytes;
        let end = area.start + area.len;
        while first < mapped.len() && (mapped[first].start + mapped[first].len).0 <= area.start {
            first += 1;
        }
        let mut overlap = ClassBytes::default();
        for m in mapped[first..].iter().take_while(|m| m.start.0 < end) {
            let lo = m.start.0.max(area.start);
            let hi = (m.start + m.len).0.min(end);
            if hi > lo {
                overlap.add(m.class, hi - lo);
            }
        }
        let covered = overlap.total();
        if covered == 0 {
            continue;
        }
        let classes = [
            (Class::Own, overlap.own),
            (Class::Redirected, overlap.redirected),
            (Class::Zero, overlap.zero),
            (Class::Error, overlap.error),
            (Class::Other, overlap.other),
        ];
        let mixed = classes.iter().filter(|(_, s)| *s > 0).count() > 1;
        // Split by share; the rounding remainder goes to the largest class.
        let mut given = 0;
        for (class, sectors) in classes {
            let share =
                u64::try_from(u128::from(bytes) * u128::from(sectors) / u128::from(covered))
                    .unwrap_or(bytes);
            result.by_class.add(class, share);
            given += share;
        }
        let largest = classes
            .iter()
            .max_by_key(|(_, s)| *s)
            .map_or(Class::Own, |(c, _)| *c);
        result.by_class.add(largest, bytes - given);
        if mixed {
            result.estimated += bytes;
        }
    }
    result
}

/// Counts the resident pages among those of bytes `offset..offset + len` of a file, given
/// its `mincore` vector (one byte per page, bit 0 set when resident).
pub fn resident_bytes(residency: &[u8], page_size: u64, offset: u64, len: u64) -> u64 {
    if len == 0 || page_size == 0 {
        return 0;
    }
    let first = usize_of(offset / page_size);
    let last = usize_of((offset + len - 1) / page_size);
    if first >= residency.len() {
        return 0;
    }
    let last = last.min(residency.len() - 1);
    let mut bytes = 0;
    for (i, flag) in residency[first..=last].iter().enumerate() {
        if flag & 1 == 1 {
            let page = (first + i) as u64 * page_size;
            let lo = page.max(offset);
            let hi = (page + page_size).min(offset + len);
            bytes += hi - lo;
        }
    }
    bytes
}

/// How many devices' worth of data each cached byte of the images serves: the cached bytes
/// all devices can read through their tables, over the cached bytes of the images. 1.0 is
/// no sharing; `None` when nothing is cached.
pub fn sharing_factor(visible: u64, cached: u64) -> Option<f64> {
    (cached > 0).then(|| visible as f64 / cached as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(start: u64, len: u64, kind: &str, params: &str) -> Target {
        Target::parse(Sectors(start), Sectors(len), kind, params).unwrap()
    }

    fn own() -> Option<&'static BlockDev> {
        static OWN: std::sync::OnceLock<BlockDev> = std::sync::OnceLock::new();
        Some(OWN.get_or_init(|| BlockDev::number(7, 0)))
    }

    fn table() -> Vec<Target> {
        vec![
            target(0, 16, "linear", "7:0 0"),   // own
            target(16, 8, "zero", ""),          // zero
            target(24, 8, "linear", "7:1 24"),  // redirected, same offset elsewhere
            target(32, 16, "linear", "7:0 64"), // redirected within the image
            target(48, 16, "linear", "7:0 48"), // own
        ]
    }

    #[test]
    fn classify_tells_own_from_redirected_by_device_and_offset() {
        let classes: Vec<Class> = classify(&table(), own()).iter().map(|m| m.class).collect();
        assert_eq!(
            classes,
            [
                Class::Own,
                Class::Zero,
                Class::Redirected,
                Class::Redirected,
                Class::Own
            ]
        );
        assert_eq!(
            TargetCounts::of(&classify(&table(), own())),
            TargetCounts {
                own: 2,
                redirected: 2,
                zero: 1,
                ..TargetCounts::default()
            }
        );
        // Without knowing its own loop device, nothing is own.
        assert!(
            classify(&table(), None)
                .iter()
                .all(|m| m.class != Class::Own)
        );
        let bytes = layout(&classify(&table(), own()));
        assert_eq!(
            bytes,
            ClassBytes {
                own: 32 * 512,
                redirected: 24 * 512,
                zero: 8 * 512,
                ..ClassBytes::default()
            }
        );
    }

    #[test]
    fn area_size_is_whole_blocks_and_bounded() {
        assert_eq!(area_sectors(8), 8);
        assert_eq!(area_sectors(1), 8);
        assert_eq!(area_sectors(8 * MAX_STATS_AREAS), 8);
        assert_eq!(area_sectors(8 * MAX_STATS_AREAS + 1), 16);
        let three_gib = 3u64 << 30 >> 9;
        let step = area_sectors(three_gib);
        assert_eq!(step % 8, 0);
        assert!(three_gib.div_ceil(step) <= MAX_STATS_AREAS);
        assert!(three_gib.div_ceil(step - 8) > MAX_STATS_AREAS);
    }

    fn area(start: u64, len: u64, sectors_read: u64) -> AreaReads {
        AreaReads {
            start,
            len,
            sectors_read,
        }
    }

    #[test]
    fn homogeneous_areas_are_exact_and_mixed_ones_are_split_and_marked() {
        let mapped = classify(&table(), own());
        // Block-sized areas: every area lies in one target.
        let areas: Vec<AreaReads> = (0..8).map(|i| area(i * 8, 8, 8)).collect();
        let reads = attribute(&mapped, &areas);
        assert_eq!(reads.total, 64 * 512);
        assert_eq!(reads.by_class, layout(&mapped));
        assert_eq!(reads.estimated, 0);
        // One area over the first 32 sectors: own 16, zero 8, redirected 8.
        let reads = attribute(&mapped, &[area(0, 32, 32), area(32, 32, 0)]);
        assert_eq!(
            reads.by_class,
            ClassBytes {
                own: 16 * 512,
                redirected: 8 * 512,
                zero: 8 * 512,
                ..ClassBytes::default()
            }
        );
        assert_eq!(reads.estimated, 32 * 512);
        // Uneven shares keep every byte.
        let reads = attribute(&mapped, &[area(8, 24, 7)]);
        assert_eq!(reads.by_class.total(), 7 * 512);
        assert_eq!(reads.total, 7 * 512);
    }

    #[test]
    fn resident_bytes_counts_only_resident_pages_in_range() {
        let residency = [1u8, 0, 1, 1, 0];
        assert_eq!(resident_bytes(&residency, 4096, 0, 5 * 4096), 3 * 4096);
        assert_eq!(resident_bytes(&residency, 4096, 2048, 4096), 2048);
        assert_eq!(resident_bytes(&residency, 4096, 4096, 4096), 0);
        assert_eq!(resident_bytes(&residency, 4096, 3 * 4096 + 100, 10), 10);
        assert_eq!(resident_bytes(&residency, 4096, 9 * 4096, 4096), 0);
        assert_eq!(resident_bytes(&residency, 4096, 0, 0), 0);
        // Bits other than bit 0 do not mean resident.
        assert_eq!(resident_bytes(&[2u8], 4096, 0, 4096), 0);
        assert_eq!(sharing_factor(0, 0), None);
        assert_eq!(sharing_factor(3, 2), Some(1.5));
    }

    #[test]
    fn error_and_unknown_targets_are_not_counted_as_zeros() {
        let table = vec![
            target(0, 16, "linear", "7:0 0"),
            target(16, 8, "error", ""),
            target(24, 8, "zero", ""),
            target(32, 8, "striped", "2 8 7:1 0 7:2 0"),
        ];
        let mapped = classify(&table, own());
        let classes: Vec<Class> = mapped.iter().map(|m| m.class).collect();
        assert_eq!(
            classes,
            [Class::Own, Class::Error, Class::Zero, Class::Other]
        );
        let counts = TargetCounts::of(&mapped);
        assert_eq!((counts.error, counts.zero, counts.other), (1, 1, 1));
        let bytes = layout(&mapped);
        assert_eq!(
            (bytes.error, bytes.zero, bytes.other),
            (8 * 512, 8 * 512, 8 * 512)
        );
        assert_eq!(bytes.total(), 40 * 512);
        // Reads attributed to an area over the error extent go to it.
        let reads = attribute(&mapped, &[area(16, 8, 8)]);
        assert_eq!(reads.by_class.error, 8 * 512);
        assert_eq!(reads.by_class.zero, 0);
    }
}
