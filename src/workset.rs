//! Boot working sets and the prefetch plan: pure logic, no I/O.
//!
//! A *working set* is what boots of an image read, as sorted, disjoint runs of the image's
//! own 4 KiB blocks (image space, not canonical space: a map that changes later, after a
//! forget or under another target budget, is applied when the set is used). vmar records it
//! on the host ([`crate::prefetch`]): the blocks of a device's read dm-stats areas whose
//! canonical pages are in the page cache ([`recorded`]).
//!
//! To warm several images at once, each set is translated through its image's map into
//! *canonical* extents (the image files the devices really read; zero extents need no I/O),
//! their union is taken so every canonical block is read once ([`union`]), what is cached
//! already is taken out ([`subtract`]), and the rest is merged across small gaps into large
//! requests in file order ([`requests`]). [`bound`] keeps a stored set within a fixed number
//! of runs by merging its smallest gaps.

use crate::image::BLOCK_SIZE;
use crate::map::{BlockMap, ImageId, Source};

/// Most runs of one stored working set (20 bytes each: at most 320 KiB per image and
/// phase). A set with more runs is coarsened: its smallest gaps are filled.
pub const MAX_RUNS: usize = 16 * 1024;

/// Recordings a run may go unread before it leaves a set: a block that none of the last
/// `KEEP_RECORDINGS` recordings of the phase found (a boot that once read something the
/// later ones do not, a package removed since) stops being warmed, so sets follow what boots
/// read now rather than grow with every odd boot.
pub const KEEP_RECORDINGS: u32 = 4;

/// Longest label of a phase (`boot`, `app`, ...).
pub const MAX_PHASE: usize = 32;

/// The phase recordings go to unless told otherwise.
pub const DEFAULT_PHASE: &str = "boot";

/// When vmard warms working sets by itself (`prefetch` in vmar.toml).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Only when asked (`vmarctl warm`).
    #[default]
    Off,
    /// Also in the background after every successful `create` and `ensure` (the libvirt
    /// hook's, at each domain start).
    Create,
}

/// `len` blocks from block `start`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Run {
    pub start: u64,
    pub len: u64,
}

impl Run {
    pub fn end(&self) -> u64 {
        self.start + self.len
    }
}

/// One stored working set of an image: its runs and how it came about.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WorkingSet {
    /// Sorted, disjoint, non-adjacent runs of image blocks.
    pub runs: Vec<Run>,
    /// For each run, the last recording (counted from 1) that found it; as many as `runs`.
    pub seen: Vec<u32>,
    /// Recordings merged into it.
    pub recordings: u32,
    /// Unix time of the last recording.
    pub updated: u64,
}

impl WorkingSet {
    /// The last recording that found run `i` (the latest when the set does not say: a set
    /// built without `seen`, or read from a record of the first format).
    pub fn seen(&self, i: usize) -> u32 {
        self.seen.get(i).copied().unwrap_or(self.recordings)
    }

    /// Blocks it holds.
    pub fn blocks(&self) -> u64 {
        blocks(&self.runs)
    }
}

/// Blocks of `runs`.
pub fn blocks(runs: &[Run]) -> u64 {
    runs.iter().map(|r| r.len).sum()
}

/// Checks a phase label: 1 to [`MAX_PHASE`] characters of `[a-z0-9_-]`.
pub fn valid_phase(phase: &str) -> bool {
    !phase.is_empty()
        && phase.len() <= MAX_PHASE
        && phase
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

/// Sorts `runs` and merges the overlapping and adjacent ones; empty runs go.
pub fn normalize(mut runs: Vec<Run>) -> Vec<Run> {
    runs.retain(|r| r.len > 0);
    runs.sort_unstable();
    let mut out: Vec<Run> = Vec::with_capacity(runs.len());
    for run in runs {
        match out.last_mut() {
            Some(last) if run.start <= last.end() => {
                let end = last.end().max(run.end());
                last.len = end - last.start;
            }
            _ => out.push(run),
        }
    }
    out
}

/// The runs of a sorted sequence of block numbers (duplicates allowed).
pub fn runs_of(blocks: impl IntoIterator<Item = u64>) -> Vec<Run> {
    let mut out: Vec<Run> = Vec::new();
    for block in blocks {
        match out.last_mut() {
            Some(last) if block >= last.start && block <= last.end() => {
                last.len = last.len.max(block + 1 - last.start);
            }
            _ => out.push(Run {
                start: block,
                len: 1,
            }),
        }
    }
    normalize(out)
}

/// Coarsens normalized `runs` to at most `max` runs (at least 1) by filling the smallest
/// gaps first: the set only grows, and grows least.
pub fn bound(runs: Vec<Run>, max: usize) -> Vec<Run> {
    let seen = vec![0; runs.len()];
    bound_seen(runs, seen, max).0
}

/// [`bound`], keeping each run's last recording: a run that swallows others was last found
/// by the latest of them.
fn bound_seen(runs: Vec<Run>, seen: Vec<u32>, max: usize) -> (Vec<Run>, Vec<u32>) {
    let max = max.max(1);
    if runs.len() <= max {
        return (runs, seen);
    }
    // Gap after run i, smallest first; fill the (len - max) smallest (ties: earlier first).
    let mut gaps: Vec<(u64, usize)> = runs
        .windows(2)
        .enumerate()
        .map(|(i, w)| (w[1].start - w[0].end(), i))
        .collect();
    gaps.sort_unstable();
    let mut fill = vec![false; runs.len()];
    for (_, i) in gaps.into_iter().take(runs.len() - max) {
        fill[i] = true;
    }
    let mut out: Vec<Run> = Vec::with_capacity(max);
    let mut out_seen: Vec<u32> = Vec::with_capacity(max);
    let mut joining = false;
    for (i, (run, seen)) in runs.into_iter().zip(seen).enumerate() {
        match (out.last_mut(), out_seen.last_mut()) {
            (Some(last), Some(last_seen)) if joining => {
                last.len = run.end() - last.start;
                *last_seen = (*last_seen).max(seen);
            }
            _ => {
                out.push(run);
                out_seen.push(seen);
            }
        }
        joining = fill[i];
    }
    (out, out_seen)
}

/// `previous` and a new recording merged: what the new recording found, and the runs of
/// earlier ones that one of the last [`KEEP_RECORDINGS`] recordings found (older runs age
/// out), bounded to [`MAX_RUNS`] runs. Age is kept per run: a run joined to one a recording
/// found (adjacent, or through a filled gap) is as recent as it.
pub fn merge_recording(previous: Option<&WorkingSet>, recorded: &[Run], now: u64) -> WorkingSet {
    let recordings = previous.map_or(1, |p| p.recordings.saturating_add(1));
    let new = normalize(recorded.to_vec());
    // Pieces of (run, last recording that found it): the new runs, and what is left of the
    // previous ones outside them, unless too old.
    let mut pieces: Vec<(Run, u32)> = new.iter().map(|&r| (r, recordings)).collect();
    if let Some(previous) = previous {
        for (i, &run) in previous.runs.iter().enumerate() {
            let seen = previous.seen(i);
            if recordings - seen.min(recordings) >= KEEP_RECORDINGS {
                continue;
            }
            pieces.extend(outside(run, &new).into_iter().map(|r| (r, seen)));
        }
    }
    pieces.sort_unstable();
    let mut runs: Vec<Run> = Vec::with_capacity(pieces.len());
    let mut seen: Vec<u32> = Vec::with_capacity(pieces.len());
    for (run, s) in pieces {
        match (runs.last_mut(), seen.last_mut()) {
            (Some(last), Some(last_seen)) if run.start <= last.end() => {
                last.len = last.end().max(run.end()) - last.start;
                *last_seen = (*last_seen).max(s);
            }
            _ => {
                runs.push(run);
                seen.push(s);
            }
        }
    }
    let (runs, seen) = bound_seen(runs, seen, MAX_RUNS);
    WorkingSet {
        runs,
        seen,
        recordings,
        updated: now,
    }
}

/// The parts of `run` that no run of `cut` (normalized) covers.
fn outside(run: Run, cut: &[Run]) -> Vec<Run> {
    let mut out = Vec::new();
    let mut at = run.start;
    let first = cut.partition_point(|c| c.end() <= run.start);
    for c in &cut[first..] {
        if c.start >= run.end() {
            break;
        }
        if c.start > at {
            out.push(Run {
                start: at,
                len: c.start - at,
            });
        }
        at = at.max(c.end());
    }
    if at < run.end() {
        out.push(Run {
            start: at,
            len: run.end() - at,
        });
    }
    out
}

/// Records of vmar before sets aged: (start, len) pairs, every run as recent as the set.
const MAGIC_V1: &[u8; 4] = b"WS1\0";
const MAGIC: &[u8; 4] = b"WS2\0";

/// Encodes a working set: magic, recordings (u32), updated (u64), then (start u64, len u64,
/// seen u32) triples, little-endian.
pub fn encode(set: &WorkingSet) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + set.runs.len() * 20);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&set.recordings.to_le_bytes());
    out.extend_from_slice(&set.updated.to_le_bytes());
    for (i, run) in set.runs.iter().enumerate() {
        out.extend_from_slice(&run.start.to_le_bytes());
        out.extend_from_slice(&run.len.to_le_bytes());
        let seen = set.seen(i);
        out.extend_from_slice(&seen.to_le_bytes());
    }
    out
}

/// Decodes what [`encode`] wrote, or an older record without the runs' last recordings
/// (they count as found by the latest); refuses anything else (wrong magic, torn entries,
/// runs out of order or overlapping, a run found by a recording the set has not had).
pub fn decode(bytes: &[u8]) -> Result<WorkingSet, String> {
    let (rest, entry) = if let Some(rest) = bytes.strip_prefix(MAGIC.as_slice()) {
        (rest, 20)
    } else if let Some(rest) = bytes.strip_prefix(MAGIC_V1.as_slice()) {
        (rest, 16)
    } else {
        return Err("not a working set record".into());
    };
    if rest.len() < 12 || (rest.len() - 12) % entry != 0 {
        return Err(format!("working set record of {} bytes", bytes.len()));
    }
    let u64_at = |b: &[u8], at: usize| {
        let mut word = [0u8; 8];
        word.copy_from_slice(&b[at..at + 8]);
        u64::from_le_bytes(word)
    };
    let mut word = [0u8; 4];
    word.copy_from_slice(&rest[..4]);
    let recordings = u32::from_le_bytes(word);
    let updated = u64_at(rest, 4);
    let count = (rest.len() - 12) / entry;
    let mut runs: Vec<Run> = Vec::with_capacity(count);
    let mut seen: Vec<u32> = Vec::with_capacity(count);
    for pair in rest[12..].chunks_exact(entry) {
        let run = Run {
            start: u64_at(pair, 0),
            len: u64_at(pair, 8),
        };
        let ordered = runs.last().is_none_or(|last| run.start > last.end());
        if run.len == 0 || run.start.checked_add(run.len).is_none() || !ordered {
            return Err(format!("bad run {run:?} in a working set record"));
        }
        let found = if entry == 20 {
            let mut word = [0u8; 4];
            word.copy_from_slice(&pair[16..20]);
            u32::from_le_bytes(word)
        } else {
            recordings
        };
        if found > recordings {
            return Err(format!(
                "run {run:?} found by recording {found} of a set of {recordings}"
            ));
        }
        runs.push(run);
        seen.push(found);
    }
    Ok(WorkingSet {
        runs,
        seen,
        recordings,
        updated,
    })
}

/// A run of blocks of one image file: the canonical place a working set's blocks are read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Canonical {
    pub image: ImageId,
    pub start: u64,
    pub len: u64,
}

impl Canonical {
    pub fn end(&self) -> u64 {
        self.start + self.len
    }
}

/// Where the blocks of `runs` (an image's working set) are read under `map`: own extents in
/// the map's image, redirected ones in their canonical image; zero extents need nothing.
/// Blocks past the map's end are dropped (a set recorded before a re-capture that shrank
/// the image). Unsorted; see [`union`].
pub fn translate(runs: &[Run], map: &BlockMap) -> Vec<Canonical> {
    let mut out = Vec::new();
    let extents = &map.extents;
    let mut first = 0;
    for run in runs {
        while first < extents.len() && extents[first].end() <= run.start {
            first += 1;
        }
        for extent in extents[first..].iter().take_while(|e| e.start < run.end()) {
            let lo = extent.start.max(run.start);
            let hi = extent.end().min(run.end());
            if hi <= lo {
                continue;
            }
            let (image, start) = match extent.source {
                Source::Zero => continue,
                Source::Own => (map.image, lo),
                Source::Redirect { image, block } => (image, block + (lo - extent.start)),
            };
            out.push(Canonical {
                image,
                start,
                len: hi - lo,
            });
        }
    }
    out
}

/// The union of canonical extents: sorted by image then block, every block once, adjacent
/// runs joined.
pub fn union(mut extents: Vec<Canonical>) -> Vec<Canonical> {
    extents.retain(|e| e.len > 0);
    extents.sort_unstable();
    let mut out: Vec<Canonical> = Vec::with_capacity(extents.len());
    for e in extents {
        match out.last_mut() {
            Some(last) if last.image == e.image && e.start <= last.end() => {
                let end = last.end().max(e.end());
                last.len = end - last.start;
            }
            _ => out.push(e),
        }
    }
    out
}

/// `wanted` less `cached` (both as [`union`] gives them): what must still be read.
pub fn subtract(wanted: &[Canonical], cached: &[Canonical]) -> Vec<Canonical> {
    let mut out = Vec::new();
    let mut c = 0;
    for w in wanted {
        let mut at = w.start;
        while c < cached.len() && (cached[c].image, cached[c].end()) <= (w.image, w.start) {
            c += 1;
        }
        let mut k = c;
        while k < cached.len() && cached[k].image == w.image && cached[k].start < w.end() {
            let hole = &cached[k];
            if hole.start > at {
                out.push(Canonical {
                    image: w.image,
                    start: at,
                    len: hole.start - at,
                });
            }
            at = at.max(hole.end());
            k += 1;
        }
        if at < w.end() {
            out.push(Canonical {
                image: w.image,
                start: at,
                len: w.end() - at,
            });
        }
    }
    out
}

/// How runs become read requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MergePolicy {
    /// Largest gap (bytes) read through to join two runs into one request: a request costs
    /// a seek, so a small gap is cheaper read than skipped.
    pub max_gap: u64,
    /// Largest request (bytes); longer runs are split.
    pub max_request: u64,
}

/// Default [`MergePolicy::max_gap`] (`prefetch_merge_gap` in vmar.toml).
pub const DEFAULT_MERGE_GAP: u64 = 128 * 1024;

/// [`MergePolicy::max_request`]: the largest request a warm reads.
pub const MAX_REQUEST: u64 = 8 << 20;

impl Default for MergePolicy {
    fn default() -> MergePolicy {
        MergePolicy {
            max_gap: DEFAULT_MERGE_GAP,
            max_request: MAX_REQUEST,
        }
    }
}

/// One read of an image file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReadRequest {
    pub image: ImageId,
    /// Byte offset and length in the file.
    pub offset: u64,
    pub len: u64,
    /// Bytes of it that were wanted (the rest are gaps read through).
    pub wanted: u64,
}

/// Read requests for `extents` (as [`union`]/[`subtract`] give them), in file order:
/// runs of one image less than `max_gap` apart are joined, requests are at most
/// `max_request` long, and nothing is read past `size(image)`.
pub fn requests(
    extents: &[Canonical],
    size: impl Fn(ImageId) -> u64,
    policy: MergePolicy,
) -> Vec<ReadRequest> {
    let max_request = policy.max_request.max(BLOCK_SIZE);
    let mut out: Vec<ReadRequest> = Vec::new();
    for e in extents {
        let limit = size(e.image);
        let offset = e.start.saturating_mul(BLOCK_SIZE);
        let end = e.end().saturating_mul(BLOCK_SIZE).min(limit);
        if end <= offset {
            continue;
        }
        let mut at = offset;
        if let Some(last) = out.last_mut()
            && last.image == e.image
            && offset >= last.offset + last.len
            && offset - (last.offset + last.len) <= policy.max_gap
        {
            let room = max_request.saturating_sub(last.len);
            let gap = offset - (last.offset + last.len);
            if gap < room {
                let take = (end - offset).min(room - gap);
                last.len += gap + take;
                last.wanted += take;
                at = offset + take;
            }
        }
        while at < end {
            let len = (end - at).min(max_request);
            out.push(ReadRequest {
                image: e.image,
                offset: at,
                len,
                wanted: len,
            });
            at += len;
        }
    }
    out
}

/// Orders requests by disk position: by `position` (where the request starts on the disk,
/// `None` where unknown: those go last), then by image and offset.
pub fn order(requests: &mut [ReadRequest], position: impl Fn(&ReadRequest) -> Option<u64>) {
    requests.sort_by_cached_key(|r| (position(r).is_none(), position(r), r.image, r.offset));
}

/// A piece of a device read through one table target: `blocks` device blocks from `start`,
/// served from block `source.1` of `source.0` (a linear target), or from no file (`None`:
/// a target whose reads cannot be cached, e.g. a raw block device).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Segment<D> {
    pub start: u64,
    pub blocks: u64,
    pub source: Option<(D, u64)>,
}

/// A table target as [`read_segments`] takes it: start and length in sectors, and the
/// source device and sector of a linear target (`None` for the others).
pub type TableTarget<D> = (u64, u64, Option<(D, u64)>);

/// The segments of a device that were read: each read area (`areas`: start and length in
/// sectors, only those with reads) cut by the linear targets (`targets`: start, length in
/// sectors, and source device and sector of linear ones, `None` for zero and others, which
/// are left out), in whole blocks. Both sorted by start, as tables and dm-stats give them.
pub fn read_segments<D: Clone>(
    areas: &[(u64, u64)],
    targets: &[TableTarget<D>],
) -> Vec<Segment<D>> {
    const PER_BLOCK: u64 = BLOCK_SIZE / crate::image::SECTOR_SIZE;
    let mut out: Vec<Segment<D>> = Vec::new();
    let mut first = 0;
    for &(start, len) in areas {
        let end = start + len;
        while first < targets.len() && targets[first].0 + targets[first].1 <= start {
            first += 1;
        }
        for (t_start, t_len, source) in targets[first..].iter().take_while(|t| t.0 < end) {
            let Some((device, from)) = source else {
                continue;
            };
            let lo = start.max(*t_start);
            let hi = end.min(t_start + t_len);
            if hi <= lo {
                continue;
            }
            let block = lo / PER_BLOCK;
            let last = hi.div_ceil(PER_BLOCK);
            // Tables vmar makes are block-aligned; a sector offset within a block is kept
            // by rounding down.
            let source_block = (from + (block * PER_BLOCK).max(*t_start) - t_start) / PER_BLOCK;
            match out.last_mut() {
                Some(prev) if prev.start + prev.blocks > block => {
                    // An area boundary inside a block: the block is counted once.
                    let skip = prev.start + prev.blocks - block;
                    if last > block + skip {
                        out.push(Segment {
                            start: block + skip,
                            blocks: last - block - skip,
                            source: Some((device.clone(), source_block + skip)),
                        });
                    }
                }
                _ => out.push(Segment {
                    start: block,
                    blocks: last - block,
                    source: Some((device.clone(), source_block)),
                }),
            }
        }
    }
    out
}

/// The image blocks a recording keeps, built segment by segment (in device order, as
/// [`read_segments`] gives them) with bounded memory: past `2 * MAX_RUNS` runs the smallest
/// gaps are filled ([`bound`]).
#[derive(Debug, Default)]
pub struct Recording {
    runs: Vec<Run>,
    /// Blocks kept (before any gap was filled).
    pub blocks: u64,
}

impl Recording {
    pub fn new() -> Recording {
        Recording::default()
    }

    /// Keeps the blocks of `segment` whose source page is cached: `cached[i]` for its i-th
    /// block; `None` (residency unknown) keeps them all.
    pub fn add<D>(&mut self, segment: &Segment<D>, cached: Option<&[bool]>) {
        for b in 0..segment.blocks {
            let keep = cached.is_none_or(|flags| {
                usize::try_from(b)
                    .ok()
                    .and_then(|i| flags.get(i))
                    .copied()
                    .unwrap_or(false)
            });
            if !keep {
                continue;
            }
            self.blocks += 1;
            let block = segment.start + b;
            match self.runs.last_mut() {
                Some(last) if block >= last.start && block <= last.end() => {
                    last.len = last.len.max(block + 1 - last.start);
                }
                _ => self.runs.push(Run {
                    start: block,
                    len: 1,
                }),
            }
        }
        if self.runs.len() > 2 * MAX_RUNS {
            self.runs = bound(normalize(std::mem::take(&mut self.runs)), MAX_RUNS);
        }
    }

    /// The runs kept, normalized.
    pub fn finish(self) -> Vec<Run> {
        normalize(self.runs)
    }
}

/// What a plan reads, in figures.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PlanFigures {
    pub requests: u64,
    /// Bytes the requests read (wanted and gaps).
    pub bytes: u64,
    /// Bytes wanted.
    pub wanted: u64,
}

/// Figures of `requests`.
pub fn figures(requests: &[ReadRequest]) -> PlanFigures {
    PlanFigures {
        requests: requests.len() as u64,
        bytes: requests.iter().map(|r| r.len).sum(),
        wanted: requests.iter().map(|r| r.wanted).sum(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::map::Extent;

    fn run(start: u64, len: u64) -> Run {
        Run { start, len }
    }

    fn can(image: ImageId, start: u64, len: u64) -> Canonical {
        Canonical { image, start, len }
    }

    /// Block-by-block model of a set of runs.
    fn expand(runs: &[Run]) -> Vec<u64> {
        runs.iter().flat_map(|r| r.start..r.end()).collect()
    }

    #[test]
    fn runs_are_sorted_merged_and_kept_apart() {
        let runs = normalize(vec![
            run(10, 2),
            run(0, 3),
            run(3, 1),
            run(11, 5),
            run(20, 0),
        ]);
        assert_eq!(runs, vec![run(0, 4), run(10, 6)]);
        assert_eq!(blocks(&runs), 10);
        assert_eq!(runs_of([1, 2, 2, 3, 9]), vec![run(1, 3), run(9, 1)]);
        assert_eq!(runs_of([7, 1, 2, 3]), vec![run(1, 3), run(7, 1)]);
    }

    #[test]
    fn bounding_fills_the_smallest_gaps_and_only_grows() {
        let runs = vec![run(0, 1), run(2, 1), run(10, 1), run(13, 1), run(100, 1)];
        let bounded = bound(runs.clone(), 3);
        assert_eq!(bounded, vec![run(0, 3), run(10, 4), run(100, 1)]);
        let covered = expand(&bounded);
        assert!(expand(&runs).iter().all(|b| covered.contains(b)));
        assert_eq!(bound(runs.clone(), 1), vec![run(0, 101)]);
        assert_eq!(bound(runs.clone(), 0), vec![run(0, 101)]);
        assert_eq!(bound(runs.clone(), 5), runs);
    }

    #[test]
    fn recordings_are_merged_by_union() {
        let first = merge_recording(None, &[run(0, 2), run(8, 1)], 5);
        assert_eq!(first.recordings, 1);
        let second = merge_recording(Some(&first), &[run(1, 3)], 9);
        assert_eq!(second.runs, vec![run(0, 4), run(8, 1)]);
        assert_eq!((second.recordings, second.updated), (2, 9));
        // 0..4 touches what the second found, so it is as recent; 8 was found by the first.
        assert_eq!(second.seen, vec![2, 1]);
        let many: Vec<Run> = (0..(MAX_RUNS as u64 + 10)).map(|i| run(i * 3, 1)).collect();
        let bounded = merge_recording(None, &many, 0);
        assert_eq!(
            (bounded.runs.len(), bounded.seen.len()),
            (MAX_RUNS, MAX_RUNS)
        );
        // A set that does not say which recording found its runs counts them as recent.
        let unaged = WorkingSet {
            runs: vec![run(20, 2)],
            seen: Vec::new(),
            recordings: 7,
            updated: 0,
        };
        let merged = merge_recording(Some(&unaged), &[run(0, 1)], 1);
        assert_eq!(merged.runs, vec![run(0, 1), run(20, 2)]);
        assert_eq!(merged.seen, vec![8, 7]);
    }

    #[test]
    fn blocks_no_recent_recording_found_age_out() {
        // The first boot reads 100..110 once; the later ones read only 0..10 and 50..60.
        let mut set = merge_recording(None, &[run(0, 10), run(100, 10)], 1);
        for n in 2..=KEEP_RECORDINGS {
            set = merge_recording(Some(&set), &[run(0, 10), run(50, 10)], n.into());
            assert_eq!(
                set.runs,
                vec![run(0, 10), run(50, 10), run(100, 10)],
                "recording {n}: found {} recordings ago, still kept",
                n - 1
            );
        }
        set = merge_recording(Some(&set), &[run(0, 10)], 9);
        // 100..110 was last found KEEP_RECORDINGS recordings ago: gone; 50..60 stays.
        assert_eq!(set.runs, vec![run(0, 10), run(50, 10)]);
        assert_eq!(set.seen, vec![KEEP_RECORDINGS + 1, KEEP_RECORDINGS]);
        // Found again, a run starts over, whole (age is kept per run: a run any part of
        // which a recording found is as recent as that recording).
        set = merge_recording(Some(&set), &[run(55, 2)], 10);
        assert_eq!(set.runs, vec![run(0, 10), run(50, 10)]);
        assert_eq!(set.seen, vec![KEEP_RECORDINGS + 1, KEEP_RECORDINGS + 2]);
        for n in 0..KEEP_RECORDINGS - 1 {
            set = merge_recording(Some(&set), &[run(55, 2)], 11 + u64::from(n));
        }
        // 0..10 aged out; 50..60, part of which every recent recording read, stays.
        assert_eq!(set.runs, vec![run(50, 10)]);
        assert_eq!(set.recordings, 2 * KEEP_RECORDINGS + 1);
    }

    #[test]
    fn records_round_trip_and_damage_is_refused() {
        let set = WorkingSet {
            runs: vec![run(0, 4), run(8, 1), run(1 << 40, 7)],
            seen: vec![1, 3, 2],
            recordings: 3,
            updated: 1_700_000_000,
        };
        let bytes = encode(&set);
        assert_eq!(decode(&bytes).unwrap(), set);
        assert!(decode(&bytes[..bytes.len() - 1]).is_err());
        assert!(decode(b"nope").is_err());
        // A run found by a recording the set has not had.
        let mut later = set.clone();
        later.seen[1] = 4;
        assert!(decode(&encode(&later)).is_err());
        // A record of the first format: no last recordings, every run counts as recent.
        let mut v1 = b"WS1\0".to_vec();
        v1.extend_from_slice(&3u32.to_le_bytes());
        v1.extend_from_slice(&1_700_000_000u64.to_le_bytes());
        for r in &set.runs {
            v1.extend_from_slice(&r.start.to_le_bytes());
            v1.extend_from_slice(&r.len.to_le_bytes());
        }
        let old = decode(&v1).unwrap();
        assert_eq!(
            (old.runs.clone(), old.seen.clone()),
            (set.runs.clone(), vec![3, 3, 3])
        );
        assert!(decode(&v1[..v1.len() - 4]).is_err());
        let mut overlapping = set.clone();
        overlapping.runs = vec![run(0, 4), run(3, 1)];
        assert!(decode(&encode(&overlapping)).is_err());
        let mut empty = set.clone();
        empty.runs = vec![run(0, 0)];
        assert!(decode(&encode(&empty)).is_err());
    }

    #[test]
    fn phases_are_short_lowercase_labels() {
        assert!(valid_phase("boot") && valid_phase("app-2") && valid_phase("os_phase"));
        assert!(!valid_phase("") && !valid_phase("Boot") && !valid_phase("a/b"));
        assert!(!valid_phase(&"x".repeat(MAX_PHASE + 1)));
    }

    fn map_of(image: ImageId, blocks: u64, extents: &[(u64, u64, Source)]) -> BlockMap {
        BlockMap {
            image,
            blocks,
            extents: extents
                .iter()
                .map(|&(start, len, source)| Extent { start, len, source })
                .collect(),
        }
    }

    #[test]
    fn translation_follows_the_map_and_skips_zeros() {
        let map = map_of(
            5,
            20,
            &[
                (0, 4, Source::Own),
                (4, 4, Source::Zero),
                (
                    8,
                    6,
                    Source::Redirect {
                        image: 1,
                        block: 100,
                    },
                ),
                (14, 6, Source::Own),
            ],
        );
        let out = translate(&[run(2, 8), run(12, 4), run(30, 2)], &map);
        assert_eq!(
            out,
            vec![can(5, 2, 2), can(1, 100, 2), can(1, 104, 2), can(5, 14, 2)]
        );
        // Block by block, against the map's own lookup.
        {
            let r = run(0, 20);
            let t = translate(&[r], &map);
            let mut via_lookup: Vec<(ImageId, u64)> = (r.start..r.end())
                .filter_map(|b| match map.source_of(b)? {
                    Source::Zero => None,
                    Source::Own => Some((5, b)),
                    Source::Redirect { image, block } => Some((image, block)),
                })
                .collect();
            let mut via_translate: Vec<(ImageId, u64)> = t
                .iter()
                .flat_map(|c| (c.start..c.end()).map(move |b| (c.image, b)))
                .collect();
            via_lookup.sort_unstable();
            via_translate.sort_unstable();
            assert_eq!(via_lookup, via_translate);
        }
    }

    #[test]
    fn the_union_reads_each_canonical_block_once() {
        // Two images redirect their blocks 0..8 to image 1's 0..8; image 2 reads its own too.
        let a = map_of(1, 8, &[(0, 8, Source::Own)]);
        let b = map_of(
            2,
            16,
            &[
                (0, 8, Source::Redirect { image: 1, block: 0 }),
                (8, 8, Source::Own),
            ],
        );
        let mut all = translate(&[run(0, 6)], &a);
        all.extend(translate(&[run(2, 8)], &b));
        let u = union(all);
        assert_eq!(u, vec![can(1, 0, 8), can(2, 8, 2)]);
        assert_eq!(
            union(vec![can(3, 5, 1), can(3, 6, 1), can(2, 6, 1), can(3, 0, 0)]),
            vec![can(2, 6, 1), can(3, 5, 2)]
        );
    }

    #[test]
    fn cached_blocks_are_not_read_again() {
        let wanted = vec![can(1, 0, 10), can(1, 20, 5), can(2, 0, 4)];
        let cached = vec![can(1, 2, 2), can(1, 8, 14), can(2, 0, 4), can(3, 0, 9)];
        assert_eq!(
            subtract(&wanted, &cached),
            vec![can(1, 0, 2), can(1, 4, 4), can(1, 22, 3)]
        );
        assert_eq!(subtract(&wanted, &[]), wanted);
        // Against a block-by-block model.
        let model: Vec<(ImageId, u64)> = wanted
            .iter()
            .flat_map(|c| (c.start..c.end()).map(move |b| (c.image, b)))
            .filter(|(i, b)| {
                !cached
                    .iter()
                    .any(|c| c.image == *i && (c.start..c.end()).contains(b))
            })
            .collect();
        let got: Vec<(ImageId, u64)> = subtract(&wanted, &cached)
            .iter()
            .flat_map(|c| (c.start..c.end()).map(move |b| (c.image, b)))
            .collect();
        assert_eq!(got, model);
    }

    #[test]
    fn requests_join_small_gaps_split_long_runs_and_stop_at_the_end() {
        let k = BLOCK_SIZE;
        let policy = MergePolicy {
            max_gap: 2 * k,
            max_request: 8 * k,
        };
        let extents = vec![
            can(1, 0, 2), // joined with the next (gap 2 blocks)
            can(1, 4, 1),
            can(1, 10, 20), // gap 5: new request, split at 8 blocks
            can(2, 0, 3),   // other file: new request, clipped to the file
        ];
        let reqs = requests(
            &extents,
            |i| if i == 2 { 2 * k + 100 } else { 1 << 30 },
            policy,
        );
        assert_eq!(
            reqs,
            vec![
                ReadRequest {
                    image: 1,
                    offset: 0,
                    len: 5 * k,
                    wanted: 3 * k
                },
                ReadRequest {
                    image: 1,
                    offset: 10 * k,
                    len: 8 * k,
                    wanted: 8 * k
                },
                ReadRequest {
                    image: 1,
                    offset: 18 * k,
                    len: 8 * k,
                    wanted: 8 * k
                },
                ReadRequest {
                    image: 1,
                    offset: 26 * k,
                    len: 4 * k,
                    wanted: 4 * k
                },
                ReadRequest {
                    image: 2,
                    offset: 0,
                    len: 2 * k + 100,
                    wanted: 2 * k + 100
                },
            ]
        );
        let f = figures(&reqs);
        assert_eq!(
            (f.requests, f.bytes, f.wanted),
            (5, 27 * k + 100, 25 * k + 100)
        );
        // A join never makes a request longer than max_request.
        let long = requests(&[can(1, 0, 7), can(1, 8, 4)], |_| u64::MAX, policy);
        assert!(long.iter().all(|r| r.len <= 8 * k), "{long:?}");
        assert_eq!(long.iter().map(|r| r.wanted).sum::<u64>(), 11 * k);
        let mut ordered = reqs.clone();
        order(&mut ordered, |r| (r.image == 2).then_some(0));
        assert_eq!(ordered[0].image, 2);
        assert_eq!(ordered[1..], reqs[..4]);
        // Image 1's file lies backwards on the disk: its requests go in disk order.
        order(&mut ordered, |r| Some(1_000_000 - r.offset / k));
        let at: Vec<(ImageId, u64)> = ordered.iter().map(|r| (r.image, r.offset / k)).collect();
        assert_eq!(at, vec![(1, 26), (1, 18), (1, 10), (1, 0), (2, 0)]);
    }

    #[test]
    fn read_areas_are_cut_by_targets_into_blocks() {
        // Device of 32 blocks (256 sectors): own 0..8 blocks, zero 8..16, redirect 16..32 to
        // device "b" sector 800.
        let targets = vec![
            (0, 64, Some(("a", 0))),
            (64, 64, None),
            (128, 128, Some(("b", 800))),
        ];
        // Areas of 4 blocks (32 sectors): read areas 1, 2 (zero part), 4 and 7.
        let areas = vec![(32, 32), (64, 32), (128, 32), (224, 32)];
        let segs = read_segments(&areas, &targets);
        assert_eq!(
            segs,
            vec![
                Segment {
                    start: 4,
                    blocks: 4,
                    source: Some(("a", 4))
                },
                Segment {
                    start: 16,
                    blocks: 4,
                    source: Some(("b", 100))
                },
                Segment {
                    start: 28,
                    blocks: 4,
                    source: Some(("b", 112))
                },
            ]
        );
        // Blocks 5 and 17 not cached; segment 2's residency unknown (kept).
        let mut recording = Recording::new();
        recording.add(&segs[0], Some(&[true, false, true, true]));
        recording.add(&segs[1], Some(&[true, false, true, true]));
        recording.add(&segs[2], None);
        assert_eq!(recording.blocks, 10);
        assert_eq!(
            recording.finish(),
            vec![run(4, 1), run(6, 2), run(16, 1), run(18, 2), run(28, 4)]
        );
    }

    #[test]
    fn a_recording_stays_bounded_and_keeps_every_block() {
        let mut recording = Recording::new();
        let segments = 5 * MAX_RUNS as u64 / 64;
        // Every other block: a run per block kept, far more runs than allowed.
        for i in 0..segments {
            let segment = Segment::<()> {
                start: i * 128,
                blocks: 128,
                source: None,
            };
            let flags: Vec<bool> = (0..128).map(|b| b % 2 == 0).collect();
            recording.add(&segment, Some(&flags));
            assert!(recording.runs.len() <= 2 * MAX_RUNS);
        }
        assert_eq!(recording.blocks, segments * 64);
        let kept = recording.finish();
        assert!(kept.len() <= 2 * MAX_RUNS, "{}", kept.len());
        let covered = |b: u64| kept.iter().any(|r| r.start <= b && b < r.end());
        assert!((0..segments).all(|i| covered(i * 128) && covered(i * 128 + 126)));
    }

    #[test]
    fn an_area_boundary_inside_a_block_counts_the_block_once() {
        let targets = vec![(0, 16, Some(("a", 0)))];
        let segs = read_segments(&[(0, 4), (4, 12)], &targets);
        assert_eq!(
            segs,
            vec![
                Segment {
                    start: 0,
                    blocks: 1,
                    source: Some(("a", 0))
                },
                Segment {
                    start: 1,
                    blocks: 1,
                    source: Some(("a", 1))
                },
            ]
        );
    }
}
