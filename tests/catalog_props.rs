//! Property tests of capture, maps and verify on random images with shared, zero, hole and
//! unique blocks, through the library (no daemon).

mod common;

use common::{Block, expected_sources, write_image};
use proptest::prelude::*;
use vmar::catalog::{CaptureStatus, Catalog};
use vmar::image::ImageFile;
use vmar::map::Source;
use vmar::verify::verify;

fn block_strategy() -> impl Strategy<Value = Block> {
    prop_oneof![
        3 => Just(Block::Hole),
        1 => Just(Block::Zero),
        4 => (0u8..6).prop_map(Block::Shared),
        2 => any::<u64>().prop_map(Block::Unique),
    ]
}

fn image_strategy() -> impl Strategy<Value = (Vec<Block>, usize)> {
    (
        prop::collection::vec(block_strategy(), 1..48),
        prop_oneof![3 => Just(0usize), 1 => (1usize..8).prop_map(|s| s * 512)],
    )
}

fn capture_all(catalog: &Catalog, dir: &std::path::Path, images: &[(Vec<Block>, usize)]) {
    for (i, (blocks, tail)) in images.iter().enumerate() {
        let path = dir.join(format!("img{i}.raw"));
        write_image(&path, blocks, *tail);
        let image = ImageFile::open(&path).unwrap();
        let (record, status) = catalog.capture(&image, None, false, &mut |_| {}).unwrap();
        assert_eq!(status, CaptureStatus::Captured);
        // Compact after some captures only, so lookups meet both one and several runs.
        if i % 2 == 1 {
            catalog.compact_index().unwrap();
        }
        assert_eq!(record.name, format!("img{i}"));
    }
}

/// Every block's source is exactly the independently computed one: identical content only,
/// first captured copy canonical, every zero block zero.
fn check_maps(catalog: &Catalog, images: &[(Vec<Block>, usize)], names: &[String]) {
    let ids: Vec<u32> = names.iter().map(|n| catalog.image(n).unwrap().id).collect();
    let want = expected_sources(images, &ids);
    for (name, want) in names.iter().zip(&want) {
        let (record, map) = catalog.map(name).unwrap();
        assert_eq!(usize::try_from(map.blocks).unwrap(), want.len());
        for (block, source) in want.iter().enumerate() {
            assert_eq!(
                map.source_of(block as u64),
                Some(*source),
                "{name} block {block}"
            );
        }
        // Extents are merged: no two neighbours continue each other.
        for w in map.extents.windows(2) {
            assert_eq!(w[0].end(), w[1].start);
            let continues = match (w[0].source, w[1].source) {
                (Source::Zero, Source::Zero) | (Source::Own, Source::Own) => true,
                (
                    Source::Redirect { image: a, block: x },
                    Source::Redirect { image: b, block: y },
                ) => a == b && x + w[0].len == y,
                _ => false,
            };
            assert!(!continues, "{name}: unmerged extents {w:?}");
        }
        let s = record.summary;
        assert_eq!(s.zero_blocks + s.own_blocks + s.redirected_blocks, s.blocks);
        let report = verify(catalog, name, &mut |_| {}).unwrap();
        assert!(report.ok, "{name}: {:?}", report.mismatch);
    }
}

/// A catalog whose captures keep `spill` records in memory (tiny: every image spills to
/// several sorted runs) or the default (small images never spill).
fn open(dir: &std::path::Path, spill: Option<usize>) -> Catalog {
    let catalog = Catalog::open(&dir.join("state")).unwrap();
    if let Some(records) = spill {
        catalog.set_spill_records(records);
    }
    catalog
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn maps_redirect_identical_content_only(
        images in prop::collection::vec(image_strategy(), 1..5),
        spill in prop::option::of(2usize..8),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let catalog = open(dir.path(), spill);
        capture_all(&catalog, dir.path(), &images);
        let names: Vec<String> = (0..images.len()).map(|i| format!("img{i}")).collect();
        check_maps(&catalog, &images, &names);
    }

    #[test]
    fn earlier_maps_never_change(images in prop::collection::vec(image_strategy(), 2..5)) {
        let dir = tempfile::tempdir().unwrap();
        let catalog = Catalog::open(&dir.path().join("state")).unwrap();
        capture_all(&catalog, dir.path(), &images[..1]);
        let (_, before) = catalog.map("img0").unwrap();
        for (i, (blocks, tail)) in images.iter().enumerate().skip(1) {
            let path = dir.path().join(format!("img{i}.raw"));
            write_image(&path, blocks, *tail);
            catalog.capture(&ImageFile::open(&path).unwrap(), None, false, &mut |_| {}).unwrap();
        }
        let (_, after) = catalog.map("img0").unwrap();
        prop_assert_eq!(before, after);
    }

    #[test]
    fn recapture_and_forget_rebuild_later_maps(
        images in prop::collection::vec(image_strategy(), 2..5),
        replacement in image_strategy(),
        which in any::<prop::sample::Index>(),
        spill in prop::option::of(2usize..8),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let catalog = open(dir.path(), spill);
        capture_all(&catalog, dir.path(), &images);
        let k = which.index(images.len());
        let names: Vec<String> = (0..images.len()).map(|i| format!("img{i}")).collect();

        // Change image k on disk: refused until re-captured explicitly.
        let path = dir.path().join(format!("img{k}.raw"));
        std::fs::remove_file(&path).unwrap();
        write_image(&path, &replacement.0, replacement.1);
        let image = ImageFile::open(&path).unwrap();
        let err = catalog.capture(&image, None, false, &mut |_| {}).unwrap_err();
        prop_assert_eq!(err.kind(), "image-changed");
        let err = verify(&catalog, &names[k], &mut |_| {}).unwrap_err();
        prop_assert_eq!(err.kind(), "image-changed");

        // A re-capture is a new capture of a new version: the old one is gone, as if never
        // captured, and the new one comes after every other image.
        let (_, status) = catalog.capture(&image, None, true, &mut |_| {}).unwrap();
        prop_assert_eq!(status, CaptureStatus::Recaptured);
        let mut rest = images.clone();
        rest.remove(k);
        let mut rest_names = names.clone();
        rest_names.remove(k);
        let mut now = rest.clone();
        now.push(replacement);
        let mut now_names = rest_names.clone();
        now_names.push(names[k].clone());
        check_maps(&catalog, &now, &now_names);

        // Forget image k: the others are mapped as if it had never been captured.
        let (_, changed) = catalog.forget(&names[k]).unwrap();
        prop_assert!(changed.is_empty(), "nothing was captured after the new version");
        prop_assert_eq!(catalog.image(&names[k]).unwrap_err().kind(), "unknown-image");
        check_maps(&catalog, &rest, &rest_names);

        // Captures after a forget skip the forgotten image's old index entries, and merges
        // drop them: another copy of the forgotten content lands where it should.
        let again = dir.path().join("again.raw");
        write_image(&again, &images[k].0, images[k].1);
        catalog.capture(&ImageFile::open(&again).unwrap(), None, false, &mut |_| {}).unwrap();
        catalog.compact_index().unwrap();
        rest.push(images[k].clone());
        rest_names.push("again".to_string());
        check_maps(&catalog, &rest, &rest_names);
    }
}

#[test]
fn capture_is_idempotent_and_names_are_unique() {
    let dir = tempfile::tempdir().unwrap();
    let catalog = Catalog::open(&dir.path().join("state")).unwrap();
    let a = dir.path().join("a.raw");
    write_image(&a, &[Block::Shared(1), Block::Unique(2)], 0);
    let image = ImageFile::open(&a).unwrap();
    let (first, status) = catalog.capture(&image, None, false, &mut |_| {}).unwrap();
    assert_eq!(status, CaptureStatus::Captured);
    let (again, status) = catalog.capture(&image, None, false, &mut |_| {}).unwrap();
    assert_eq!(status, CaptureStatus::Unchanged);
    assert_eq!(first, again);
    // Same file under another name: refused, naming the existing entry.
    let err = catalog
        .capture(&image, Some("other"), false, &mut |_| {})
        .unwrap_err();
    assert_eq!(err.kind(), "already-captured");
    // Another file under a taken name.
    let b = dir.path().join("b.raw");
    write_image(&b, &[Block::Shared(1)], 0);
    let err = catalog
        .capture(&ImageFile::open(&b).unwrap(), Some("a"), false, &mut |_| {})
        .unwrap_err();
    assert_eq!(err.kind(), "name-taken");
    let err = catalog
        .capture(
            &ImageFile::open(&b).unwrap(),
            Some("../x"),
            false,
            &mut |_| {},
        )
        .unwrap_err();
    assert_eq!(err.kind(), "invalid-name");
    assert_eq!(catalog.images().unwrap(), vec![first]);
}

#[test]
fn catalog_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let a = dir.path().join("a.raw");
    write_image(&a, &[Block::Shared(1), Block::Hole, Block::Shared(1)], 1024);
    let before = {
        let catalog = Catalog::open(&state).unwrap();
        catalog
            .capture(&ImageFile::open(&a).unwrap(), None, false, &mut |_| {})
            .unwrap();
        catalog.map("a").unwrap()
    };
    let catalog = Catalog::open(&state).unwrap();
    assert_eq!(catalog.map("a").unwrap(), before);
    // Block 2 is a partial copy of block 0: different length, so not shared.
    assert_eq!(before.1.source_of(2), Some(Source::Own));
}

#[test]
fn index_runs_left_by_a_crash_are_removed_on_open() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let images: Vec<(Vec<Block>, usize)> = vec![
        (
            vec![Block::Shared(1), Block::Unique(1), Block::Shared(2)],
            0,
        ),
        (
            vec![Block::Shared(2), Block::Shared(1), Block::Unique(2)],
            0,
        ),
    ];
    let before = {
        let catalog = Catalog::open(&state).unwrap();
        capture_all(&catalog, dir.path(), &images);
        catalog.map("img1").unwrap()
    };
    // A run written by a capture that died before its commit, and a half-written one.
    let index = state.join(vmar::catalog::INDEX_DIR);
    std::fs::write(index.join("run-00000000000000ff.idx"), [7u8; 44]).unwrap();
    std::fs::write(index.join("run-0000000000000100.tmp"), [7u8; 10]).unwrap();
    let catalog = Catalog::open(&state).unwrap();
    assert!(!index.join("run-00000000000000ff.idx").exists());
    assert!(!index.join("run-0000000000000100.tmp").exists());
    assert_eq!(catalog.map("img1").unwrap(), before);
    check_maps(&catalog, &images, &["img0".into(), "img1".into()]);
}
