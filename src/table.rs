//! Device-mapper tables: a map turned into `linear` and `zero` targets in 512-byte sectors
//! (and `error` targets where an image changed under a live device, see [`fail_closed`]).
//! Pure and deterministic; the device path loads exactly what this produces, and live tables
//! read back from the kernel parse into the same [`Target`] type, so they compare as values.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::map::{BlockMap, ImageId, Source};
use crate::units::{Blocks, Sectors};

/// The block device a `linear` target reads: `MAJOR:MINOR` as the kernel reports it, or a
/// name (a `/dev` path, or a `loop:IMAGE` placeholder in tables printed for people).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub enum BlockDev {
    Number { major: u32, minor: u32 },
    Named(String),
}

impl BlockDev {
    pub fn number(major: u32, minor: u32) -> BlockDev {
        BlockDev::Number { major, minor }
    }
}

impl fmt::Display for BlockDev {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BlockDev::Number { major, minor } => write!(f, "{major}:{minor}"),
            BlockDev::Named(name) => f.write_str(name),
        }
    }
}

impl FromStr for BlockDev {
    type Err = String;

    fn from_str(s: &str) -> Result<BlockDev, String> {
        if s.is_empty() || s.contains(char::is_whitespace) {
            return Err(format!("bad block device {s:?}"));
        }
        if let Some((major, minor)) = s.split_once(':')
            && let (Ok(major), Ok(minor)) = (major.parse(), minor.parse())
        {
            return Ok(BlockDev::Number { major, minor });
        }
        Ok(BlockDev::Named(s.to_string()))
    }
}

impl From<BlockDev> for String {
    fn from(d: BlockDev) -> String {
        d.to_string()
    }
}

impl TryFrom<String> for BlockDev {
    type Error = String;
    fn try_from(s: String) -> Result<BlockDev, String> {
        s.parse()
    }
}

/// What a target does.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum TargetKind {
    /// Reads return zeros; no I/O.
    Zero,
    /// Reads go to `device` starting at sector `offset`.
    Linear { device: BlockDev, offset: Sectors },
    /// Every read fails with EIO: what vmar loads over the extents of an image that changed
    /// under a live device (fail closed, as dm-verity does), and what `dmsetup remove
    /// --force` leaves behind.
    Error,
    /// Any other target a live table may hold (vmar loads none).
    Other { target_type: String, params: String },
}

/// One line of a table: `len` sectors starting at sector `start` of the mapped device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Target {
    pub start: Sectors,
    pub len: Sectors,
    #[serde(flatten)]
    pub kind: TargetKind,
}

impl Target {
    pub fn end(&self) -> Sectors {
        self.start + self.len
    }

    /// Target type name as the kernel knows it.
    pub fn target_type(&self) -> &str {
        match &self.kind {
            TargetKind::Zero => "zero",
            TargetKind::Linear { .. } => "linear",
            TargetKind::Error => "error",
            TargetKind::Other { target_type, .. } => target_type,
        }
    }

    /// Target parameters as the kernel takes them.
    pub fn params(&self) -> String {
        match &self.kind {
            TargetKind::Zero | TargetKind::Error => String::new(),
            TargetKind::Linear { device, offset } => format!("{device} {offset}"),
            TargetKind::Other { params, .. } => params.clone(),
        }
    }

    /// For a `linear` target: the device and first sector it reads.
    pub fn linear_source(&self) -> Option<(&BlockDev, Sectors)> {
        match &self.kind {
            TargetKind::Linear { device, offset } => Some((device, *offset)),
            _ => None,
        }
    }
}

/// A table line as `dmsetup table` prints it: `start len type [params]`.
impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {} {}", self.start, self.len, self.target_type())?;
        let params = self.params();
        if !params.is_empty() {
            write!(f, " {params}")?;
        }
        Ok(())
    }
}

impl FromStr for Target {
    type Err = String;

    fn from_str(line: &str) -> Result<Target, String> {
        let mut words = line.split_whitespace();
        let mut number = |what: &str| -> Result<Sectors, String> {
            words
                .next()
                .and_then(|w| w.parse().ok())
                .map(Sectors)
                .ok_or_else(|| format!("table line {line:?}: bad {what}"))
        };
        let start = number("start")?;
        let len = number("length")?;
        let target_type = words
            .next()
            .ok_or_else(|| format!("table line {line:?}: no target type"))?;
        let params: Vec<&str> = words.collect();
        Target::parse(start, len, target_type, &params.join(" "))
    }
}

impl Target {
    /// A target from the parts the kernel reports for it.
    pub fn parse(
        start: Sectors,
        len: Sectors,
        target_type: &str,
        params: &str,
    ) -> Result<Target, String> {
        let words: Vec<&str> = params.split_whitespace().collect();
        let kind = match (target_type, words.as_slice()) {
            ("zero", []) => TargetKind::Zero,
            ("error", []) => TargetKind::Error,
            ("linear", [device, offset]) => TargetKind::Linear {
                device: device.parse()?,
                offset: Sectors(
                    offset
                        .parse()
                        .map_err(|_| format!("linear target: bad offset {offset:?}"))?,
                ),
            },
            ("zero" | "linear" | "error", _) => {
                return Err(format!("{target_type} target: bad parameters {params:?}"));
            }
            (other, _) => TargetKind::Other {
                target_type: other.to_string(),
                params: words.join(" "),
            },
        };
        Ok(Target { start, len, kind })
    }
}

/// Builds the table of an image of `size` bytes from its map. `device_of` names the block
/// device that serves an image's own blocks (its loop device, or a placeholder). Adjacent
/// targets that continue each other are merged, and the last target ends at the image's
/// last sector even when its last block is partial.
pub fn build(map: &BlockMap, size: u64, device_of: impl Fn(ImageId) -> BlockDev) -> Vec<Target> {
    build_guarded(map, size, |id| Some(device_of(id)))
}

/// Like [`build`], but extents that read an image `device_of` gives no device for (one that
/// changed under a live device) become `error` targets: reads of them fail, reads of the
/// rest are served.
pub fn build_guarded(
    map: &BlockMap,
    size: u64,
    device_of: impl Fn(ImageId) -> Option<BlockDev>,
) -> Vec<Target> {
    let total = Sectors::of_bytes(size);
    let mut targets: Vec<Target> = Vec::with_capacity(map.extents.len());
    for extent in &map.extents {
        let start = Blocks(extent.start).sectors();
        if start >= total {
            break;
        }
        let len = Blocks(extent.end()).sectors().min(total) - start;
        let kind = match extent.source {
            Source::Zero => TargetKind::Zero,
            Source::Own => match device_of(map.image) {
                Some(device) => TargetKind::Linear {
                    device,
                    offset: start,
                },
                None => TargetKind::Error,
            },
            Source::Redirect { image, block } => match device_of(image) {
                Some(device) => TargetKind::Linear {
                    device,
                    offset: Blocks(block).sectors(),
                },
                None => TargetKind::Error,
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

/// `targets` with every `linear` target that reads one of `changed` replaced by an `error`
/// target of the same sectors (adjacent ones merged): the table a live device gets when
/// images it reads changed and the policy is to fail closed. Extents that read other images
/// or zeros are kept as they are, so the VM still reads them.
pub fn fail_closed(targets: &[Target], changed: &[BlockDev]) -> Vec<Target> {
    let mut out: Vec<Target> = Vec::with_capacity(targets.len());
    for t in targets {
        let kind = match t.linear_source() {
            Some((device, _)) if changed.contains(device) => TargetKind::Error,
            _ => t.kind.clone(),
        };
        if let Some(last) = out.last_mut()
            && continues(last, &kind)
        {
            last.len += t.len;
            continue;
        }
        out.push(Target {
            start: t.start,
            len: t.len,
            kind,
        });
    }
    out
}

fn continues(last: &Target, kind: &TargetKind) -> bool {
    match (&last.kind, kind) {
        (TargetKind::Zero, TargetKind::Zero) | (TargetKind::Error, TargetKind::Error) => true,
        (
            TargetKind::Linear { device, offset },
            TargetKind::Linear {
                device: d,
                offset: o,
            },
        ) => device == d && *offset + last.len == *o,
        _ => false,
    }
}

/// The table as `dmsetup table` prints it: one `start len type params` line per target.
pub fn to_text(targets: &[Target]) -> String {
    let mut text = String::new();
    for t in targets {
        text.push_str(&t.to_string());
        text.push('\n');
    }
    text
}

/// Parses a table in `dmsetup table` form.
pub fn from_text(text: &str) -> Result<Vec<Target>, String> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(str::parse)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::BLOCK_SIZE;
    use crate::map::MapBuilder;

    fn dev(id: ImageId) -> BlockDev {
        BlockDev::Named(format!("/dev/loop{id}"))
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
        assert_eq!(table.iter().map(|t| t.len.0).sum::<u64>(), 48);
        assert!(table.windows(2).all(|w| w[0].end() == w[1].start));
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

    #[test]
    fn tables_round_trip_through_their_text() {
        let text = "0 16 linear 7:0 0\n16 8 zero\n24 8 linear /dev/loop1 40\n32 8 error\n";
        let table = from_text(text).unwrap();
        assert_eq!(to_text(&table), text);
        assert_eq!(
            table[0].linear_source(),
            Some((&BlockDev::number(7, 0), Sectors(0)))
        );
        assert_eq!(table[3].target_type(), "error");
        let json = serde_json::to_value(&table[0]).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"start": 0, "len": 16, "type": "linear", "device": "7:0", "offset": 0})
        );
        let back: Target = serde_json::from_value(json).unwrap();
        assert_eq!(back, table[0]);
        for bad in [
            "",
            "0",
            "x 8 zero",
            "0 8",
            "0 8 linear 7:0",
            "0 8 linear 7:0 x",
            "0 8 zero 1",
            "0 8 error 1",
        ] {
            assert!(bad.parse::<Target>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn failing_closed_errors_only_the_extents_of_changed_images() {
        let mut b = MapBuilder::new(1, 6);
        b.push(0, 2, Source::Own);
        b.push(2, 1, Source::Redirect { image: 0, block: 5 });
        b.push(3, 1, Source::Redirect { image: 2, block: 0 });
        b.push(4, 2, Source::Own);
        let map = b.finish();
        let table = build(&map, 6 * BLOCK_SIZE, dev);
        // Image 0 changed: only the extent redirected into it fails.
        let closed = fail_closed(&table, &[dev(0)]);
        assert_eq!(
            to_text(&closed),
            "0 16 linear /dev/loop1 0\n\
             16 8 error\n\
             24 8 linear /dev/loop2 0\n\
             32 16 linear /dev/loop1 32\n"
        );
        // Its own image changed too: adjacent error extents merge, the rest still reads.
        let closed = fail_closed(&table, &[dev(0), dev(1)]);
        assert_eq!(
            to_text(&closed),
            "0 24 error\n24 8 linear /dev/loop2 0\n32 16 error\n"
        );
        assert_eq!(
            closed.last().map(Target::end),
            table.last().map(Target::end)
        );
        // Built the same way from the map when the changed images have no device.
        let guarded = build_guarded(&map, 6 * BLOCK_SIZE, |id| (id == 2).then(|| dev(id)));
        assert_eq!(guarded, closed);
        // Nothing changed: the same table.
        assert_eq!(fail_closed(&table, &[]), table);
        assert_eq!(
            Target::parse(Sectors(0), Sectors(8), "error", "")
                .unwrap()
                .kind,
            TargetKind::Error
        );
    }
}
