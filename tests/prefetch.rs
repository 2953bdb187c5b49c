//! Boot working sets on the in-memory kernel (`vmard --sim`): recording what a device read
//! (dm-stats areas x page cache), showing it, warming the union of several images' sets
//! (each canonical block once), the background warm of `prefetch = "create"` and the
//! recorder of `record_after`. Expected sets and unions are computed here from the blocks
//! each image was written with, independently of vmar's maps.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{
    BLOCK, Block, Daemon, capture_all, err, expected_sources, family_blocks, family_paths, ok, s,
    write_image,
};
use serde_json::Value;
use vmar::kernel::sim::SimKernel;
use vmar::map::Source;

/// base, web (own blocks from 40) and db (own every 5th block): 64 blocks each, holes
/// every 10th block, zeros after them.
fn family(dir: &Path) -> (Vec<PathBuf>, Vec<(Vec<Block>, usize)>) {
    let [base, web, db] = family_blocks();
    let paths = family_paths(dir);
    let blocks = vec![(base, 0), (web, 0), (db, 0)];
    for (path, (b, tail)) in paths.iter().zip(&blocks) {
        write_image(path, b, *tail);
        // Written back, so that dropping the cache can drop them.
        std::fs::File::open(path).unwrap().sync_all().unwrap();
    }
    (paths, blocks)
}

/// The family captured by a vmard on the simulated kernel with vmar.toml `config` (none when
/// empty): the daemon, the image paths, the family's blocks, the images' ids and where each
/// block is served from.
struct Captured {
    daemon: Daemon,
    paths: Vec<PathBuf>,
    family: Vec<(Vec<Block>, usize)>,
    ids: Vec<u32>,
    sources: Vec<Vec<Source>>,
}

fn captured(dir: &Path, config: &str) -> Captured {
    let (paths, family) = family(dir);
    let daemon = if config.is_empty() {
        Daemon::start_sim(dir, "")
    } else {
        let file = dir.join("vmar.toml");
        std::fs::write(&file, config).unwrap();
        Daemon::start_args(
            dir,
            &dir.join("state"),
            &dir.join("run/vmard.sock"),
            &["--sim", s(&dir.join("kernel")), "--config", s(&file)],
        )
    };
    capture_all(&daemon, &paths);
    let ids = ids(&daemon);
    let sources = expected_sources(&family, &ids);
    Captured {
        daemon,
        paths,
        family,
        ids,
        sources,
    }
}

fn sim(dir: &Path) -> SimKernel {
    SimKernel::open(&dir.join("kernel")).unwrap()
}

/// Reads blocks `blocks` of device `name` through the simulated kernel.
fn read(kernel: &SimKernel, name: &str, blocks: impl IntoIterator<Item = u64>) {
    for b in blocks {
        kernel.read(name, b * BLOCK as u64, BLOCK as u64).unwrap();
    }
}

/// Catalog ids of the images, by position in `family`.
fn ids(daemon: &Daemon) -> Vec<u32> {
    let images = ok(daemon, &["images"]);
    ["base", "web", "db"]
        .iter()
        .map(|n| {
            images["images"]
                .as_array()
                .unwrap()
                .iter()
                .find(|i| i["name"] == *n)
                .map(|i| u32::try_from(i["id"].as_u64().unwrap()).unwrap())
                .unwrap()
        })
        .collect()
}

/// The blocks of a working set, from `working-set NAME --extents`.
fn set_blocks(daemon: &Daemon, name: &str, phase: &str) -> BTreeSet<u64> {
    let out = ok(daemon, &["working-set", name, "--extents"]);
    out["sets"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["phase"] == phase)
        .flat_map(|s| s["extents"].as_array().unwrap().clone())
        .flat_map(|e| {
            let start = e[0].as_u64().unwrap();
            start..start + e[1].as_u64().unwrap()
        })
        .collect()
}

/// The non-zero blocks among `blocks` of image `which`.
fn non_zero(family: &[(Vec<Block>, usize)], which: usize, blocks: &[u64]) -> BTreeSet<u64> {
    blocks
        .iter()
        .copied()
        .filter(|b| {
            !matches!(
                family[which].0[usize::try_from(*b).unwrap()],
                Block::Hole | Block::Zero
            )
        })
        .collect()
}

/// Canonical (image id, block) of each of `blocks` of image `which`.
fn canonical(
    sources: &[Vec<Source>],
    ids: &[u32],
    which: usize,
    blocks: &BTreeSet<u64>,
) -> BTreeSet<(u32, u64)> {
    blocks
        .iter()
        .filter_map(|b| match sources[which][usize::try_from(*b).unwrap()] {
            Source::Zero => None,
            Source::Own => Some((ids[which], *b)),
            Source::Redirect { image, block } => Some((image, block)),
        })
        .collect()
}

/// Checks a vmarctl document against its definition in docs/vmarctl-json.schema.json: the
/// required keys are there and no key is unknown (one level deep).
fn assert_documented(command: &str, document: &Value) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/vmarctl-json.schema.json");
    let schema: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let def = &schema["$defs"][command];
    for key in def["required"].as_array().unwrap() {
        assert!(
            document.get(key.as_str().unwrap()).is_some(),
            "{command}: no {key}: {document}"
        );
    }
    for key in document.as_object().unwrap().keys() {
        assert!(
            def["properties"].get(key).is_some(),
            "{command}: {key} undocumented"
        );
    }
}

fn drop_cache(paths: &[PathBuf]) {
    for p in paths {
        vmar::prefetch::io::drop_cache(p).unwrap();
    }
}

/// Whether every block of `blocks` (of the files by id) is cached.
fn all_cached(paths: &[PathBuf], ids: &[u32], blocks: &BTreeSet<(u32, u64)>) -> bool {
    blocks.iter().all(|(id, b)| {
        let i = ids.iter().position(|x| x == id).unwrap();
        let file = std::fs::File::open(&paths[i]).unwrap();
        let size = file.metadata().unwrap().len();
        vmar::prefetch::io::resident_blocks(&file, &paths[i], size, *b, 1).unwrap()[0]
    })
}

#[test]
fn recorded_sets_are_what_devices_read_and_warming_reads_their_union_once() {
    let dir = tempfile::tempdir().unwrap();
    let Captured {
        daemon,
        paths,
        family,
        ids,
        sources,
    } = captured(dir.path(), "");
    ok(&daemon, &["create", "web1", "web"]);
    ok(&daemon, &["create", "db1", "db"]);
    let kernel = sim(dir.path());

    // Nothing recorded yet.
    let empty = ok(&daemon, &["working-set", "web1"]);
    assert_eq!(empty["image"], "web");
    assert_eq!(empty["sets"], serde_json::json!([]));

    // web1 boots: blocks 0..12 and 40..46 (own ones). Zero blocks are not kept.
    let first: Vec<u64> = (0..12).chain(40..46).collect();
    read(&kernel, "web1", first.iter().copied());
    let rec = ok(&daemon, &["record", "web1"]);
    let want = non_zero(&family, 1, &first);
    assert_eq!(rec["image"], "web");
    assert_eq!(rec["set"]["phase"], "boot");
    assert_eq!(rec["set"]["recordings"], 1);
    assert_eq!(
        rec["recorded_bytes"].as_u64().unwrap(),
        want.len() as u64 * BLOCK as u64,
        "{rec}"
    );
    assert_eq!(set_blocks(&daemon, "web1", "boot"), want);
    // By image name too, and through the read-only socket's request.
    assert_eq!(set_blocks(&daemon, "web", "boot"), want);

    // A later boot reads more: the set is the union.
    read(&kernel, "web1", 50..53);
    let rec = ok(&daemon, &["record", "web1"]);
    assert_eq!(rec["set"]["recordings"], 2);
    let mut want_union = want.clone();
    want_union.extend(non_zero(&family, 1, &[50, 51, 52]));
    assert_eq!(set_blocks(&daemon, "web1", "boot"), want_union);
    // Another phase is kept apart; --replace starts the phase over.
    ok(&daemon, &["record", "web1", "--phase", "app"]);
    assert_eq!(set_blocks(&daemon, "web1", "app"), want_union);
    assert_eq!(
        err(&daemon, &["record", "web1", "--phase", "Bad/Phase"]),
        "protocol"
    );

    // db1 boots 0..12 (mostly base's shared blocks, which web reads at the same place).
    let db_first: Vec<u64> = (0..12).collect();
    read(&kernel, "db1", db_first.iter().copied());
    ok(&daemon, &["record", "db1"]);
    let db_set = non_zero(&family, 2, &db_first);
    assert_eq!(set_blocks(&daemon, "db1", "boot"), db_set);

    // Warm both, boot phase: each canonical block once.
    let web_canon = canonical(&sources, &ids, 1, &want_union);
    let db_canon = canonical(&sources, &ids, 2, &db_set);
    let union: BTreeSet<(u32, u64)> = web_canon.union(&db_canon).copied().collect();
    assert!(
        union.len() < web_canon.len() + db_canon.len(),
        "the test wants shared blocks"
    );
    drop_cache(&paths);
    let cold = !all_cached(&paths, &ids, &union);
    let report = ok(&daemon, &["warm", "web1", "db1", "--phase", "boot"]);
    // Dropping the cache works on most file systems (not tmpfs): then warm reads.
    assert!(
        !cold || report["read_bytes"].as_u64().unwrap() > 0,
        "{report}"
    );
    let block = BLOCK as u64;
    assert_eq!(
        report["union_bytes"].as_u64().unwrap(),
        union.len() as u64 * block,
        "{report}"
    );
    assert_eq!(
        report["shared_bytes"].as_u64().unwrap(),
        (web_canon.len() + db_canon.len() - union.len()) as u64 * block
    );
    let cached = report["cached_bytes"].as_u64().unwrap();
    let request_bytes = report["request_bytes"].as_u64().unwrap();
    let gaps = report["gap_bytes"].as_u64().unwrap();
    assert_eq!(
        cached + request_bytes - gaps,
        union.len() as u64 * block,
        "{report}"
    );
    assert_eq!(report["read_bytes"], report["request_bytes"], "{report}");
    assert_eq!(report["cancelled"], false);
    assert!(report["requests"].as_u64().unwrap() <= union.len() as u64);
    assert!(all_cached(&paths, &ids, &union), "warmed blocks are cached");
    // Warm again: everything is cached, nothing is read.
    let again = ok(&daemon, &["warm", "web1", "db1"]);
    assert_eq!(again["read_bytes"], 0, "{again}");
    assert_eq!(again["requests"], 0, "{again}");

    // An image without a set is reported, not an error; an unknown name is.
    let none = ok(&daemon, &["warm", "base"]);
    assert_eq!(none["images"][0]["phases"], serde_json::json!([]));
    assert_eq!(none["union_bytes"], 0);
    assert_eq!(err(&daemon, &["warm", "nosuch"]), "unknown-image");
    assert_eq!(
        daemon.ctl(&["working-set", "nosuch"]).status.code(),
        Some(4)
    );
    assert_eq!(err(&daemon, &["record", "nosuch"]), "unknown-device");
    // Cancel with nothing running stops nothing.
    assert_eq!(ok(&daemon, &["warm", "--cancel"])["stopped"], 0);

    // Forget one phase, then all.
    assert_eq!(
        ok(
            &daemon,
            &["working-set", "web1", "--forget", "--phase", "app"]
        )["forgotten"],
        1
    );
    assert!(set_blocks(&daemon, "web1", "app").is_empty());
    ok(&daemon, &["working-set", "web1", "--forget"]);
    assert_eq!(
        ok(&daemon, &["working-set", "web1"])["sets"],
        serde_json::json!([])
    );
    // The documents are as documented.
    for (command, args) in [
        ("record", vec!["record", "db1"]),
        ("working-set", vec!["working-set", "db1", "--extents"]),
        ("warm", vec!["warm", "db1", "web1"]),
    ] {
        let (ok, document) = daemon.document(&args);
        assert!(ok, "{document}");
        assert_documented(command, &document);
    }
    // The text forms say the same.
    let text = daemon.ctl(&["working-set", "db1"]);
    assert!(String::from_utf8_lossy(&text.stdout).contains("phase boot"));
}

#[test]
fn create_warms_in_the_background_and_the_recorder_records_after_the_first_open() {
    let dir = tempfile::tempdir().unwrap();
    let Captured {
        daemon,
        paths,
        family,
        ids,
        sources,
    } = captured(dir.path(), "prefetch = \"create\"\nrecord_after = 1\n");
    ok(&daemon, &["create", "web1", "web"]);
    let kernel = sim(dir.path());
    // Reads while closed (a look at the disk before the VM starts) do not count, once the
    // recorder saw the device closed.
    read(&kernel, "web1", 20..24);
    std::thread::sleep(Duration::from_secs(2));
    kernel.open_device("web1").unwrap();
    let boot: Vec<u64> = (0..8).chain(44..48).collect();
    read(&kernel, "web1", boot.iter().copied());
    let want = non_zero(&family, 1, &boot);
    let deadline = Instant::now() + Duration::from_secs(15);
    while set_blocks(&daemon, "web1", "boot").is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    // The set is what was read, less what left the page cache in the second before the
    // recording: on this shared machine other jobs may drop every cache (a cold-cache
    // benchmark), so a block missing from the set must be one that is not cached now.
    let got = set_blocks(&daemon, "web1", "boot");
    assert!(got.is_subset(&want), "{got:?} beyond {want:?}");
    for b in want.difference(&got) {
        let canon = canonical(&sources, &ids, 1, &BTreeSet::from([*b]));
        assert!(
            !all_cached(&paths, &ids, &canon),
            "block {b} was read and is cached, but not in {got:?}"
        );
    }
    assert!(!got.is_empty());
    kernel.close_device("web1").unwrap();

    // A new device of web: its set is warmed in the background after create.
    drop_cache(&paths);
    let canon = canonical(&sources, &ids, 1, &got);
    let cold = !all_cached(&paths, &ids, &canon);
    let created = ok(&daemon, &["create", "web2", "web"]);
    assert_eq!(created["device"]["state"], "active", "{created}");
    let deadline = Instant::now() + Duration::from_secs(15);
    while !all_cached(&paths, &ids, &canon) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        all_cached(&paths, &ids, &canon),
        "the set was not warmed (cold before: {cold})"
    );
}

#[test]
fn warms_merge_across_the_configured_gap_which_a_reload_changes() {
    let dir = tempfile::tempdir().unwrap();
    let Captured {
        daemon,
        paths,
        family,
        ids,
        sources,
    } = captured(dir.path(), "prefetch_merge_gap = 0\n");
    let config = dir.path().join("vmar.toml");
    ok(&daemon, &["create", "web1", "web"]);
    // Two runs of web's own blocks, two blocks apart.
    let boot = [44, 45, 48, 49];
    read(&sim(dir.path()), "web1", boot);
    ok(&daemon, &["record", "web1"]);
    let want = non_zero(&family, 1, &boot);
    assert_eq!(want.len(), 4, "the test wants four data blocks");
    assert_eq!(set_blocks(&daemon, "web1", "boot"), want);
    let canon = canonical(&sources, &ids, 1, &want);
    let block = BLOCK as u64;
    let warm_cold = || {
        drop_cache(&paths);
        // Dropping the cache works on most file systems (not tmpfs).
        let cold = canon
            .iter()
            .all(|b| !all_cached(&paths, &ids, &BTreeSet::from([*b])));
        (cold, ok(&daemon, &["warm", "web1"]))
    };
    // Gap 0: each run its own request, nothing beyond the set.
    let (cold, report) = warm_cold();
    if cold {
        assert_eq!(report["requests"], 2, "{report}");
        assert_eq!(report["gap_bytes"], 0, "{report}");
        assert_eq!(
            report["read_bytes"].as_u64().unwrap(),
            4 * block,
            "{report}"
        );
    }
    // The default gap after a reload: one request reading through the two-block gap.
    std::fs::write(&config, "").unwrap();
    daemon.signal(nix::sys::signal::Signal::SIGHUP);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (cold, report) = warm_cold();
        if !cold {
            break;
        }
        if report["requests"] == 1 {
            assert_eq!(report["gap_bytes"].as_u64().unwrap(), 2 * block, "{report}");
            assert_eq!(
                report["read_bytes"].as_u64().unwrap(),
                6 * block,
                "{report}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the reload did not apply: {report}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // A gap longer than a request is refused by --check-config.
    std::fs::write(&config, "prefetch_merge_gap = 9000000\n").unwrap();
    let checked = common::vmard(
        dir.path(),
        &dir.path().join("state"),
        &dir.path().join("run/vmard.sock"),
        &["--check-config", "--config", s(&config)],
    )
    .output()
    .unwrap();
    assert!(!checked.status.success());
    assert!(
        String::from_utf8_lossy(&checked.stdout).contains("prefetch_merge_gap")
            || String::from_utf8_lossy(&checked.stderr).contains("prefetch_merge_gap"),
        "{checked:?}"
    );
}
