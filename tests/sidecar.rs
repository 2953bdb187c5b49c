//! Digest sidecars across "hosts": several vmards (each its own state dir and socket, on the
//! simulated kernel) sharing one image directory, as hosts share an NFS export.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use common::{Block, Daemon, s, write_image};
use proptest::prelude::*;
use serde_json::Value;
use vmar::catalog::Catalog;
use vmar::image::ImageFile;
use vmar::sidecar::{Mode, Sidecars};

/// Three 2 MiB images sharing blocks, with holes and zero blocks.
fn images(share: &Path) -> Vec<PathBuf> {
    let base: Vec<Block> = (0..512u64)
        .map(|i| match i % 16 {
            0 => Block::Hole,
            1 => Block::Zero,
            n => Block::Shared(u8::try_from(n * 7 + i % 5).unwrap()),
        })
        .collect();
    let mut web = base.clone();
    for (i, block) in web.iter_mut().enumerate().skip(400) {
        *block = Block::Unique(i as u64);
    }
    let db: Vec<Block> = (0..512u64)
        .map(|i| {
            if i % 3 == 0 {
                Block::Shared(u8::try_from(i % 200).unwrap())
            } else {
                Block::Unique(10_000 + i)
            }
        })
        .collect();
    let paths = vec![
        share.join("base.raw"),
        share.join("web.raw"),
        share.join("db.raw"),
    ];
    write_image(&paths[0], &base, 0);
    write_image(&paths[1], &web, 0);
    write_image(&paths[2], &db, 2048);
    paths
}

/// The share, on another file system than the hosts' state dirs (tmpfs), as an NFS export
/// is: no host's hold on a captured file (a hard link in its own state dir) lands on it, so
/// every host sees the images single-linked, as on a real share.
fn share() -> tempfile::TempDir {
    tempfile::tempdir_in("/dev/shm").unwrap()
}

/// A host: its own state, socket and config, the share as image root.
fn host(root: &Path, share: &Path, name: &str, config: &str) -> Daemon {
    let dir = root.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    let config_path = dir.join("vmar.toml");
    std::fs::write(&config_path, config).unwrap();
    Daemon::start_args(
        share,
        &dir.join("state"),
        &dir.join("vmard.sock"),
        &["--config", s(&config_path), "--sim", s(&dir.join("kernel"))],
    )
}

/// Captures `path` and returns the capture result of it.
fn capture(host: &Daemon, path: &Path) -> Value {
    let (ok, images) = host.json(&["capture", s(path)]);
    assert!(ok, "{images}");
    images[0]["result"].clone()
}

fn fingerprint(result: &Value) -> String {
    result["image"]["fingerprint"].as_str().unwrap().to_string()
}

fn map(host: &Daemon, name: &str) -> Value {
    let (ok, map) = host.document(&["map", name, "--extents"]);
    assert!(ok, "{map}");
    map
}

fn data_bytes(paths: &[PathBuf]) -> u64 {
    paths
        .iter()
        .map(|p| std::fs::metadata(p).unwrap().len())
        .sum()
}

#[test]
fn a_second_host_imports_without_reading_the_images_and_builds_the_same_maps() {
    let dir = tempfile::tempdir().unwrap();
    let share_dir = share();
    let share = share_dir.path().to_path_buf();
    let paths = images(&share);
    let a = host(dir.path(), &share, "a", "sidecars = \"write\"\n");
    let b = host(
        dir.path(),
        &share,
        "b",
        "sidecars = \"read\"\nsidecar_sample = 0\n",
    );
    // No sidecars; on a real share (NFS) no hold beside the images either, which tmpfs, a
    // local file system, needs said.
    let c = host(dir.path(), &share, "c", "hold_beside_images = false\n");
    let mut hashed = Vec::new();
    for path in &paths {
        let result = capture(&a, path);
        assert_eq!(result["sidecar"]["written"], true, "{result}");
        assert_eq!(result["sidecar"]["imported"], false, "{result}");
        hashed.push(result);
    }
    for (i, path) in paths.iter().enumerate() {
        let name = path.file_stem().unwrap().to_str().unwrap();
        assert!(
            share.join(format!(".{name}.raw.vmar-digests")).exists(),
            "{name}"
        );
        let before = b.rchar();
        let imported = capture(&b, path);
        let read = b.rchar() - before;
        assert_eq!(imported["sidecar"]["imported"], true, "{imported}");
        assert_eq!(imported["image"]["scan"]["bytes_read"], 0, "{imported}");
        let size = std::fs::metadata(path).unwrap().len();
        // What vmard read: the sidecar (32 bytes a non-zero block, 1/128 of the data) and
        // its catalog, not the image.
        assert!(
            read < size / 16,
            "host b read {read} bytes for a {size}-byte image"
        );
        assert_eq!(fingerprint(&imported), fingerprint(&hashed[i]));
        // A host without sidecars reads every data byte: the measurement can tell.
        let before = c.rchar();
        let control = capture(&c, path);
        assert!(control.get("sidecar").is_none(), "{control}");
        assert!(c.rchar() - before >= size * 3 / 4, "host c read too little");
        assert_eq!(fingerprint(&control), fingerprint(&hashed[i]));
        for other in [&b, &c] {
            assert_eq!(map(other, name), map(&a, name), "map of {name}");
        }
    }
    // The default sample reads a few blocks and checks them.
    let d = host(dir.path(), &share, "d", "sidecars = \"read\"\n");
    let total = data_bytes(&paths);
    let mut read = 0;
    for path in &paths {
        let result = capture(&d, path);
        assert_eq!(result["sidecar"]["imported"], true, "{result}");
        let sampled = result["sidecar"]["sampled_blocks"].as_u64().unwrap();
        assert!(sampled >= 1);
        assert_eq!(
            result["image"]["scan"]["bytes_read"].as_u64().unwrap(),
            sampled * 4096
        );
        read += sampled * 4096;
    }
    assert!(read <= total / 100, "{read} of {total}");
}

/// Host `b` captures `path` after `damage` was done to its sidecar; returns the result.
fn recapture_after(b: &Daemon, path: &Path, name: &str) -> Value {
    let _ = b.ctl(&["forget", name]);
    capture(b, path)
}

#[test]
fn tampered_truncated_stale_and_untrusted_sidecars_are_refused_and_rewritten() {
    let dir = tempfile::tempdir().unwrap();
    let share_dir = share();
    let share = share_dir.path().to_path_buf();
    let paths = images(&share);
    let path = &paths[1];
    let sidecar = share.join(".web.raw.vmar-digests");
    let a = host(dir.path(), &share, "a", "sidecars = \"write\"\n");
    let expected = fingerprint(&capture(&a, path));
    let good = std::fs::read(&sidecar).unwrap();
    let b = host(dir.path(), &share, "b", "sidecars = \"write\"\n");
    let size = std::fs::metadata(path).unwrap().len();
    type Damage = Box<dyn Fn()>;
    let cases: Vec<(&str, Damage)> = vec![
        ("untrusted", {
            let (sidecar, good) = (sidecar.clone(), good.clone());
            Box::new(move || {
                let mut bytes = good.clone();
                bytes[100] ^= 1;
                std::fs::write(&sidecar, &bytes).unwrap();
            })
        }),
        ("corrupt", {
            let (sidecar, good) = (sidecar.clone(), good.clone());
            Box::new(move || std::fs::write(&sidecar, &good[..good.len() / 2]).unwrap())
        }),
        ("untrusted", {
            let (sidecar, good) = (sidecar.clone(), good.clone());
            Box::new(move || {
                std::fs::write(&sidecar, &good).unwrap();
                std::fs::set_permissions(&sidecar, std::fs::Permissions::from_mode(0o666)).unwrap();
            })
        }),
        ("stale", {
            let (sidecar, good, image) = (sidecar.clone(), good.clone(), path.clone());
            Box::new(move || {
                std::fs::write(&sidecar, &good).unwrap();
                std::fs::set_permissions(&sidecar, std::fs::Permissions::from_mode(0o644)).unwrap();
                // Only the times change: the content is the same, but the sidecar cannot
                // know that without reading it all.
                let file = std::fs::File::options().write(true).open(&image).unwrap();
                file.set_modified(std::time::SystemTime::now()).unwrap();
            })
        }),
    ];
    for (kind, damage) in cases {
        damage();
        let result = recapture_after(&b, path, "web");
        let refused = result["sidecar"]["refused"].as_str().unwrap_or("");
        assert!(refused.starts_with(kind), "{kind}: {result}");
        assert_eq!(result["sidecar"]["imported"], false);
        assert_eq!(result["sidecar"]["written"], true, "rewritten: {result}");
        assert!(result["image"]["scan"]["bytes_read"].as_u64().unwrap() >= size * 3 / 4);
        assert_eq!(fingerprint(&result), expected, "{kind}");
        // The rewritten sidecar is good again: the next import takes it.
        let again = recapture_after(&b, path, "web");
        assert_eq!(again["sidecar"]["imported"], true, "{kind}: {again}");
    }
    // A sidecar that lies about content while bound to the image's identity is caught by
    // the sample (here every block).
    let key = dir.path().join("fleet.key");
    std::fs::write(&key, [7u8; 32]).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let liar = Sidecars::new(Mode::Write, None, Some(&key), 0.0)
        .unwrap()
        .unwrap();
    let image = ImageFile::open(path).unwrap();
    let mut writer = liar.writer(&image).unwrap();
    let mut digests = Vec::new();
    vmar::scan::hash_image(&image, &mut |_, _| {}, &mut |r| {
        digests.extend_from_slice(r);
        Ok(())
    })
    .unwrap();
    digests[300].1[0] ^= 1;
    writer.push(&digests);
    writer
        .commit(&vmar::records::fingerprint(image.size, &digests))
        .unwrap();
    let config = format!(
        "sidecars = \"read\"\nsidecar_key = \"{}\"\nsidecar_sample = 1.0\n",
        key.display()
    );
    let k = host(dir.path(), &share, "k", &config);
    let result = capture(&k, path);
    let refused = result["sidecar"]["refused"].as_str().unwrap_or("");
    assert!(refused.starts_with("mismatch"), "{result}");
    assert_eq!(fingerprint(&result), expected);
    // Without the key, the keyed sidecar is not trusted.
    let _ = b.ctl(&["forget", "web"]);
    let result = capture(&b, path);
    let refused = result["sidecar"]["refused"].as_str().unwrap_or("");
    assert!(refused.starts_with("untrusted"), "{result}");
}

#[test]
fn two_hosts_capturing_one_image_at_once_leave_one_valid_sidecar() {
    let dir = tempfile::tempdir().unwrap();
    let share_dir = share();
    let share = share_dir.path().to_path_buf();
    let path = share.join("big.raw");
    let blocks: Vec<Block> = (0..4096u64).map(Block::Unique).collect();
    write_image(&path, &blocks, 0);
    let a = host(dir.path(), &share, "a", "sidecars = \"write\"\n");
    let b = host(dir.path(), &share, "b", "sidecars = \"write\"\n");
    let (ra, rb) = std::thread::scope(|scope| {
        let ta = scope.spawn(|| capture(&a, &path));
        let tb = scope.spawn(|| capture(&b, &path));
        (ta.join().unwrap(), tb.join().unwrap())
    });
    assert_eq!(fingerprint(&ra), fingerprint(&rb));
    let written = [&ra, &rb]
        .iter()
        .filter(|r| r["sidecar"]["written"] == true)
        .count();
    assert!(written >= 1, "{ra}\n{rb}");
    let names: Vec<String> = std::fs::read_dir(&share)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let mut names = names;
    names.sort();
    assert_eq!(
        names,
        vec![".big.raw.vmar-digests", "big.raw"],
        "no temporary left"
    );
    let c = host(
        dir.path(),
        &share,
        "c",
        "sidecars = \"read\"\nsidecar_sample = 0.01\n",
    );
    let result = capture(&c, &path);
    assert_eq!(result["sidecar"]["imported"], true, "{result}");
    assert_eq!(fingerprint(&result), fingerprint(&ra));
}

#[test]
fn a_fleet_manifest_captures_in_order_and_reports_hosts_that_differ() {
    let dir = tempfile::tempdir().unwrap();
    let share_dir = share();
    let share = share_dir.path().to_path_buf();
    images(&share);
    let manifest = share.join("fleet.manifest");
    std::fs::write(
        &manifest,
        "# the fleet's images\nbase.raw\nweb.raw web\ndb.raw\n",
    )
    .unwrap();
    let a = host(dir.path(), &share, "a", "sidecars = \"write\"\n");
    let b = host(dir.path(), &share, "b", "sidecars = \"read\"\n");
    for (h, name) in [(&a, "a"), (&b, "b")] {
        let (ok, doc) = h.document(&["capture", "--manifest", s(&manifest), "--host", name]);
        assert!(ok, "{doc}");
        assert_eq!(doc["images"].as_array().unwrap().len(), 3);
    }
    let report = std::fs::read_to_string(share.join("fleet.manifest.hosts/a")).unwrap();
    assert_eq!(report.lines().count(), 3, "{report}");
    assert_eq!(
        report,
        std::fs::read_to_string(share.join("fleet.manifest.hosts/b")).unwrap()
    );
    let (ok, status) = a.document(&["fleet-status", s(&manifest)]);
    assert!(ok, "{status}");
    assert_eq!(status["differ"], 0);
    // Host c captures in another order: same contents, other maps, and status says so.
    let c = host(dir.path(), &share, "c", "sidecars = \"read\"\n");
    let reversed = share.join("reversed.manifest");
    std::fs::write(&reversed, "db.raw\nweb.raw\nbase.raw\n").unwrap();
    let (ok, doc) = c.document(&["capture", "--manifest", s(&reversed), "--host", "c"]);
    assert!(ok, "{doc}");
    std::fs::copy(
        share.join("reversed.manifest.hosts/c"),
        share.join("fleet.manifest.hosts/c"),
    )
    .unwrap();
    let out = a.ctl(&["--json", "fleet-status", s(&manifest)]);
    assert_eq!(out.status.code(), Some(3));
    let status: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(status["differ"].as_u64().unwrap() >= 1, "{status}");
    let images = status["images"].as_array().unwrap();
    for image in images {
        let hosts = image["hosts"].as_object().unwrap();
        // Contents are the same everywhere; maps of a and b agree.
        assert_eq!(hosts["a"][0], hosts["c"][0]);
        assert_eq!(hosts["a"], hosts["b"]);
    }
}

/// Random images of shared, unique and zero blocks.
fn image_sets() -> impl Strategy<Value = Vec<Vec<Block>>> {
    let block = prop_oneof![
        Just(Block::Hole),
        Just(Block::Zero),
        (0u8..6).prop_map(Block::Shared),
        (0u64..1000).prop_map(Block::Unique),
    ];
    prop::collection::vec(prop::collection::vec(block, 1..80), 1..4)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(12))]

    /// The catalog entry and map an import builds are exactly those hashing builds.
    #[test]
    fn imported_entries_equal_hashed_entries(images in image_sets()) {
        let dir = tempfile::tempdir().unwrap();
        let share = dir.path().join("share");
        std::fs::create_dir(&share).unwrap();
        let paths: Vec<PathBuf> = images
            .iter()
            .enumerate()
            .map(|(i, blocks)| {
                let path = share.join(format!("i{i}.raw"));
                write_image(&path, blocks, if i == 1 { 1024 } else { 0 });
                path
            })
            .collect();
        let hashing = Catalog::open(&dir.path().join("hashing")).unwrap();
        hashing.set_sidecars(Sidecars::new(Mode::Write, None, None, 0.0).unwrap());
        let importing = Catalog::open(&dir.path().join("importing")).unwrap();
        importing.set_sidecars(Sidecars::new(Mode::Read, None, None, 1.0).unwrap());
        for path in &paths {
            let image = ImageFile::open(path).unwrap();
            let h = hashing.capture_changing(&image, None, false, &mut |_| {}).unwrap();
            prop_assert!(h.sidecar.as_ref().unwrap().written);
            let i = importing.capture_changing(&image, None, false, &mut |_| {}).unwrap();
            prop_assert!(i.sidecar.as_ref().unwrap().imported);
            prop_assert_eq!(&h.record.fingerprint, &i.record.fingerprint);
            prop_assert_eq!(&h.record.summary, &i.record.summary);
            prop_assert_eq!(h.record.id, i.record.id);
        }
        for path in &paths {
            let name = path.file_stem().unwrap().to_str().unwrap();
            prop_assert_eq!(hashing.map(name).unwrap().1, importing.map(name).unwrap().1);
            // The whole record but what says how and when this host got it.
            let (mut h, mut i) = (hashing.image(name).unwrap(), importing.image(name).unwrap());
            for r in [&mut h, &mut i] {
                r.captured_at = 0;
                r.scan = Default::default();
            }
            prop_assert_eq!(h, i);
        }
        // The digest lists and the index runs, byte for byte.
        let files = |state: &str| {
            let index = dir.path().join(state).join(vmar::catalog::INDEX_DIR);
            let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(&index)
                .unwrap()
                .map(|e| {
                    let e = e.unwrap();
                    (e.file_name().into_string().unwrap(), std::fs::read(e.path()).unwrap())
                })
                .collect();
            files.sort();
            files
        };
        let (h, i) = (files("hashing"), files("importing"));
        prop_assert!(h.iter().any(|(name, _)| name.ends_with(".dig")), "{:?}", h.iter().map(|f| &f.0).collect::<Vec<_>>());
        prop_assert_eq!(h, i);
    }
}
