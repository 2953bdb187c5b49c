//! Real-kernel tests of the device path: device-mapper and loop devices. They need root and
//! a kernel with dm-mod, so they are ignored by `cargo test`; `tools/kernel-test.py` builds
//! them, boots Debian's kernel in QEMU and runs them there with `--ignored`.

mod common;

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::{Block, Daemon, alias_node, capture_all, device_states, ok, s, write_image};
use serde_json::Value;

const NEEDS: &str = "needs root and a kernel with device-mapper: run tools/kernel-test.py";

/// Removes every dm device when a test ends, passed or failed, so that one failure does not
/// leave devices behind that make the next tests fail too. Only in the test guest.
struct CleanKernel;

impl Drop for CleanKernel {
    fn drop(&mut self) {
        let _ = std::process::Command::new("dmsetup")
            .args(["remove_all", "--force"])
            .output();
    }
}

#[must_use]
fn require_dm() -> CleanKernel {
    assert!(
        Path::new("/dev/mapper/control").exists(),
        "no /dev/mapper/control: {NEEDS}"
    );
    CleanKernel
}

fn node(name: &str) -> PathBuf {
    PathBuf::from(format!("/dev/mapper/vmar-{name}"))
}

fn read_all(path: &Path) -> Vec<u8> {
    let mut data = Vec::new();
    File::open(path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()))
        .read_to_end(&mut data)
        .unwrap();
    data
}

/// Asserts that the device serves exactly the image's bytes, naming the first differing block.
fn assert_same(device: &Path, image: &Path) {
    let got = read_all(device);
    let want = std::fs::read(image).unwrap();
    assert_eq!(got.len(), want.len(), "{} size", device.display());
    if let Some(at) = got.iter().zip(&want).position(|(a, b)| a != b) {
        panic!(
            "{} differs from {} at byte {at} (block {})",
            device.display(),
            image.display(),
            at / 4096
        );
    }
}

/// Waits up to 5 s for `done`.
fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn loop_backing_files() -> Vec<String> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir("/sys/block").unwrap().flatten() {
        if let Ok(file) = std::fs::read_to_string(entry.path().join("loop/backing_file")) {
            files.push(file.trim().to_string());
        }
    }
    files
}

/// A base image, two derived ones sharing most of it, and one sharing little; holes, zero
/// blocks, unique blocks, and a partial last block.
fn family(dir: &Path) -> Vec<PathBuf> {
    let base: Vec<Block> = (0..256)
        .map(|i| match i % 10 {
            0 | 1 => Block::Hole,
            2 => Block::Zero,
            _ => Block::Shared((i % 200) as u8),
        })
        .collect();
    let mut web = base.clone();
    for (i, b) in web.iter_mut().enumerate().skip(180) {
        *b = Block::Unique(i as u64);
    }
    let mut db = base.clone();
    for (i, b) in db.iter_mut().enumerate().step_by(7) {
        *b = Block::Unique(10_000 + i as u64);
    }
    db.extend((0..64).map(|i| Block::Unique(20_000 + i)));
    let other: Vec<Block> = (0..100)
        .map(|i| {
            if i % 3 == 0 {
                Block::Shared(5)
            } else {
                Block::Unique(30_000 + i)
            }
        })
        .collect();
    let paths: Vec<PathBuf> = ["base", "web", "db", "other"]
        .iter()
        .map(|n| dir.join(format!("{n}.raw")))
        .collect();
    write_image(&paths[0], &base, 0);
    write_image(&paths[1], &web, 0);
    write_image(&paths[2], &db, 1536);
    write_image(&paths[3], &other, 0);
    paths
}

fn create(daemon: &Daemon, name: &str, image: &str) -> Value {
    let (ok, out) = daemon.json(&["create", name, image]);
    assert!(ok, "create {name}: {out}");
    out
}

#[test]
#[ignore = "needs root and a kernel with device-mapper: run tools/kernel-test.py"]
fn real_devices_serve_images_byte_for_byte() {
    let _clean = require_dm();
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(dir.path());
    let images = family(dir.path());
    capture_all(&daemon, &images);
    for name in ["base", "web", "db", "other"] {
        let out = create(&daemon, name, name);
        assert_eq!(out["device"]["state"], "active", "{out}");
        assert_eq!(out["device"]["live"]["read_only"], true, "{out}");
    }
    let states = device_states(&daemon);
    assert_eq!(states.len(), 4, "{states:?}");
    assert!(
        states.iter().all(|(_, state)| state == "active"),
        "{states:?}"
    );
    for (name, image) in ["base", "web", "db", "other"].iter().zip(&images) {
        assert_same(&node(name), image);
    }
    // Writes are refused: the device is read-only end to end (the kernel may allow opening
    // it for writing, but not writing).
    if let Ok(mut device) = std::fs::OpenOptions::new().write(true).open(node("web")) {
        use std::io::Write;
        assert!(
            device
                .write_all(&[0u8; 4096])
                .and_then(|_| device.sync_all())
                .is_err()
        );
    }
    assert_same(&node("web"), &images[1]);
    // One loop device per image file, shared by all devices.
    let backing = loop_backing_files();
    for image in &images {
        let n = backing.iter().filter(|b| **b == s(image)).count();
        assert_eq!(
            n,
            1,
            "{} has {n} loop devices: {backing:?}",
            image.display()
        );
    }
    let (ok, out) = daemon.json(&["create", "web", "web"]);
    assert!(!ok);
    assert_eq!(out["error"]["kind"], "device-exists", "{out}");

    for name in ["base", "web", "db", "other"] {
        let (ok, out) = daemon.json(&["remove", name]);
        assert!(ok, "{out}");
        assert!(!node(name).exists());
    }
    assert_eq!(daemon.json(&["list"]).1, serde_json::json!([]));
    eventually("loop devices to detach", || {
        let backing = loop_backing_files();
        images.iter().all(|i| !backing.iter().any(|b| b == s(i)))
    });
    let (ok, out) = daemon.json(&["remove", "web"]);
    assert!(!ok);
    assert_eq!(out["error"]["kind"], "unknown-device", "{out}");
}

/// Linear targets of a device's live table as (device, offset) by start sector.
fn linear_targets(daemon: &Daemon, name: &str) -> Vec<(u64, u64, String, u64)> {
    let (ok, out) = daemon.json(&["status", name, "--table"]);
    assert!(ok, "{out}");
    out["table"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["type"] == "linear")
        .map(|t| {
            (
                t["start"].as_u64().unwrap(),
                t["len"].as_u64().unwrap(),
                t["device"].as_str().unwrap().to_string(),
                t["offset"].as_u64().unwrap(),
            )
        })
        .collect()
}

#[test]
#[ignore = "needs root and a kernel with device-mapper: run tools/kernel-test.py"]
fn real_shared_blocks_come_from_one_place() {
    let _clean = require_dm();
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(dir.path());
    let images = family(dir.path());
    capture_all(&daemon, &images[..3]);
    create(&daemon, "base", "base");
    create(&daemon, "web", "web");
    create(&daemon, "db", "db");
    let base = linear_targets(&daemon, "base");
    let base_dev = base[0].2.clone();
    let web = linear_targets(&daemon, "web");
    let db = linear_targets(&daemon, "db");
    // Block 3 holds the same content in all three images: both derived devices read it from
    // base's loop device at the very sector base itself serves it from.
    let sector = 3 * 8;
    let find = |table: &[(u64, u64, String, u64)]| {
        table
            .iter()
            .find(|(start, len, _, _)| *start <= sector && sector < start + len)
            .map(|(start, _, dev, off)| (dev.clone(), off + (sector - start)))
            .unwrap()
    };
    let in_base = find(&base);
    assert_eq!(in_base, (base_dev.clone(), sector));
    assert_eq!(find(&web), in_base);
    assert_eq!(find(&db), in_base);
    for name in ["web", "db"] {
        let (_, status) = daemon.json(&["status", name]);
        let reads: Vec<&str> = status["reads_from"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert!(reads.contains(&base_dev.as_str()), "{status}");
    }
    for name in ["base", "web", "db"] {
        assert!(daemon.json(&["remove", name]).0);
    }
}

#[test]
#[ignore = "needs root and a kernel with device-mapper: run tools/kernel-test.py"]
fn real_refresh_while_reading() {
    let _clean = require_dm();
    let dir = tempfile::tempdir().unwrap();
    // A target budget so small that web's table gives up its redirections: it reads only
    // its own image. SIGHUP with a larger budget, then refresh, swaps in the whole map.
    let config = dir.path().join("vmar.toml");
    std::fs::write(&config, "max_targets = 1\n").unwrap();
    let daemon = Daemon::start_args(
        dir.path(),
        &dir.path().join("state"),
        &dir.path().join("run/vmard.sock"),
        &["--config", config.to_str().unwrap()],
    );
    let images = family(dir.path());
    capture_all(&daemon, &images[..2]);
    create(&daemon, "web", "web");
    let before = linear_targets(&daemon, "web");
    let devices: std::collections::BTreeSet<String> = before.iter().map(|t| t.2.clone()).collect();
    assert_eq!(devices.len(), 1, "web reads only itself: {before:?}");

    let stop = Arc::new(AtomicBool::new(false));
    let reads = Arc::new(AtomicU64::new(0));
    let want = std::fs::read(&images[1]).unwrap();
    let reader = {
        let (stop, reads) = (Arc::clone(&stop), Arc::clone(&reads));
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let got = read_all(&node("web"));
                if got != want {
                    return Err(got.iter().zip(&want).position(|(a, b)| a != b));
                }
                reads.fetch_add(1, Ordering::Relaxed);
            }
            Ok(())
        })
    };
    eventually("a first full read", || reads.load(Ordering::Relaxed) > 0);
    // base cannot be forgotten while web reads from it.
    let (ok, out) = daemon.json(&["forget", "base"]);
    assert!(!ok && out["error"]["kind"] == "image-in-use", "{out}");
    std::fs::write(&config, "max_targets = 100000\n").unwrap();
    daemon.signal(nix::sys::signal::Signal::SIGHUP);
    eventually("the reloaded budget", || {
        daemon.json(&["status", "web"]).1["state"] == "differs"
    });
    let (ok, out) = daemon.json(&["refresh", "web"]);
    assert!(ok, "{out}");
    let after = linear_targets(&daemon, "web");
    let devices: std::collections::BTreeSet<String> = after.iter().map(|t| t.2.clone()).collect();
    assert_eq!(
        devices.len(),
        2,
        "web now reads from base and itself: {after:?}"
    );
    let seen = reads.load(Ordering::Relaxed);
    eventually("reads after the swap", || {
        reads.load(Ordering::Relaxed) > seen + 1
    });
    stop.store(true, Ordering::Relaxed);
    let outcome = reader.join().unwrap();
    assert_eq!(outcome, Ok(()), "a read during refresh saw wrong data");
    assert_same(&node("web"), &images[1]);
    assert!(daemon.json(&["remove", "web"]).0);
}

#[test]
#[ignore = "needs root and a kernel with device-mapper: run tools/kernel-test.py"]
fn real_remove_while_open() {
    let _clean = require_dm();
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(dir.path());
    let images = family(dir.path());
    capture_all(&daemon, &images[..1]);
    create(&daemon, "base", "base");
    let open = File::open(node("base")).unwrap();
    let (ok, out) = daemon.json(&["remove", "base"]);
    assert!(!ok);
    assert_eq!(out["error"]["kind"], "device-busy", "{out}");
    assert!(
        out["error"]["message"]
            .as_str()
            .unwrap()
            .contains("--deferred")
    );
    assert_eq!(daemon.json(&["status", "base"]).1["state"], "active");
    let (ok, out) = daemon.json(&["remove", "--deferred", "base"]);
    assert!(ok, "{out}");
    assert_eq!(out["deferred"], true);
    drop(open);
    eventually("the deferred removal", || {
        daemon.json(&["list"]).1 == serde_json::json!([])
    });
}

#[test]
#[ignore = "needs root and a kernel with device-mapper: run tools/kernel-test.py"]
fn real_target_budget() {
    let _clean = require_dm();
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start_args(
        dir.path(),
        &dir.path().join("state"),
        &dir.path().join("vmard.sock"),
        &["--max-targets", "8"],
    );
    // Short shared runs alternating with unique ones: dozens of extents.
    let base: Vec<Block> = (0..64u8).map(Block::Shared).collect();
    let derived: Vec<Block> = (0..128)
        .map(|i| {
            if i % 4 == 0 {
                Block::Shared(u8::try_from(i / 2).unwrap())
            } else {
                Block::Unique(i)
            }
        })
        .collect();
    let paths = [dir.path().join("base.raw"), dir.path().join("derived.raw")];
    write_image(&paths[0], &base, 0);
    write_image(&paths[1], &derived, 0);
    capture_all(&daemon, &paths);
    let out = create(&daemon, "derived", "derived");
    assert!(out["targets"].as_u64().unwrap() <= 8, "{out}");
    assert!(
        out["budget"]["extents_before"].as_u64().unwrap() > 8,
        "{out}"
    );
    assert!(
        out["budget"]["redirected_blocks_dropped"].as_u64().unwrap() > 0,
        "{out}"
    );
    let (_, status) = daemon.json(&["status", "derived"]);
    assert!(status["live"]["targets"].as_u64().unwrap() <= 8, "{status}");
    assert_same(&node("derived"), &paths[1]);
    assert!(daemon.json(&["remove", "derived"]).0);
}

#[test]
#[ignore = "needs root and a kernel with device-mapper: run tools/kernel-test.py"]
fn real_changed_images_are_refused() {
    let _clean = require_dm();
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(dir.path());
    let images = family(dir.path());
    capture_all(&daemon, &images[..2]);
    // Base changes after capture: base, and web which reads from it, are refused.
    write_image(&images[0], &[Block::Unique(1)], 0);
    for (name, image) in [("base", "base"), ("web", "web")] {
        let (ok, out) = daemon.json(&["create", name, image]);
        assert!(!ok, "{out}");
        assert_eq!(out["error"]["kind"], "image-changed", "{out}");
        assert!(!node(name).exists());
    }
    assert_eq!(daemon.json(&["list"]).1, serde_json::json!([]));
}

#[test]
#[ignore = "needs root and a kernel with device-mapper: run tools/kernel-test.py"]
fn real_large_table() {
    let _clean = require_dm();
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(dir.path());
    // Every other block shared: one target per block.
    let blocks = 16 * 1024;
    let base: Vec<Block> = (0..blocks / 2).map(|i| Block::Unique(i as u64)).collect();
    let derived: Vec<Block> = (0..blocks)
        .map(|i| {
            if i % 2 == 0 {
                base[i / 2].clone()
            } else {
                Block::Unique(1 << 40 | i as u64)
            }
        })
        .collect();
    let paths = [dir.path().join("base.raw"), dir.path().join("derived.raw")];
    write_image(&paths[0], &base, 0);
    write_image(&paths[1], &derived, 0);
    capture_all(&daemon, &paths);
    let out = create(&daemon, "derived", "derived");
    let targets = out["targets"].as_u64().unwrap();
    assert_eq!(targets, blocks as u64, "{}", out["budget"]);
    println!(
        "LARGE-TABLE: {targets} targets created and loaded in {:.3} s",
        out["seconds"].as_f64().unwrap()
    );
    assert_same(&node("derived"), &paths[1]);
    assert!(daemon.json(&["remove", "derived"]).0);
}

fn live_table(daemon: &Daemon, name: &str) -> Value {
    let (ok, out) = daemon.json(&["status", name, "--table"]);
    assert!(ok, "{out}");
    out["table"].clone()
}

#[test]
#[ignore = "needs root and a kernel with device-mapper: run tools/kernel-test.py"]
fn real_restore_after_reboot() {
    let _clean = require_dm();
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("vmard.sock");
    let daemon = Daemon::start(dir.path());
    let images = family(dir.path());
    capture_all(&daemon, &images[..3]);
    for name in ["base", "web", "db"] {
        create(&daemon, name, name);
    }
    // udev gives each device a stable name from vmar's rules: /dev/vmar/NAME is a block
    // node of its own (AppArmor sees that path, not /dev/dm-N), by-id a symlink.
    for name in ["base", "web", "db"] {
        let by_id = PathBuf::from(format!("/dev/disk/by-id/vmar-{name}"));
        eventually("the udev link", || by_id.exists());
        assert_eq!(
            std::fs::canonicalize(&by_id).unwrap(),
            std::fs::canonicalize(node(name)).unwrap()
        );
        let vmar = PathBuf::from(format!("/dev/vmar/{name}"));
        eventually("the /dev/vmar node", || vmar.exists());
        let meta = std::fs::symlink_metadata(&vmar).unwrap();
        assert!(meta.file_type().is_block_device(), "{vmar:?}: {meta:?}");
        assert_eq!(meta.rdev(), std::fs::metadata(node(name)).unwrap().rdev());
        assert_eq!(meta.permissions().mode() & 0o777, 0o640, "{vmar:?}");
    }
    // A removed device takes its node along; another device under that name gets a new one.
    assert!(daemon.json(&["remove", "db"]).0);
    eventually("the removed device's node to go", || {
        !Path::new("/dev/vmar/db").exists()
    });
    create(&daemon, "db", "db");
    eventually("the node of the device created again", || {
        std::fs::metadata("/dev/vmar/db")
            .is_ok_and(|m| m.rdev() == std::fs::metadata(node("db")).map(|n| n.rdev()).unwrap_or(0))
    });
    let before: Vec<Value> = ["base", "web"]
        .iter()
        .map(|n| live_table(&daemon, n))
        .collect();
    let state = daemon.stop();

    // A reboot: no device survives. A crash left a half-created device behind, and db's image
    // changed while the host was down.
    let run = |args: &[&str]| {
        let out = std::process::Command::new("dmsetup")
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "dmsetup {args:?}: {out:?}");
    };
    run(&["remove_all", "--force"]);
    // A leftover of this state dir (its instance id in the UUID), and one of vmar before
    // instance ids that this catalog does not record: only the first is vmard's to remove.
    let id = std::fs::read_to_string(state.join("instance-id")).unwrap();
    let junk = format!("VMAR-{}-junk", id.trim());
    run(&["create", "vmar-junk", "--uuid", &junk, "--notable"]);
    run(&["create", "vmar-older", "--uuid", "VMAR-older", "--notable"]);
    write_image(&images[2], &[Block::Unique(99)], 0);
    // A node a device removed without vmar's udev rules left behind: it names a number that
    // any device may get next. vmard removes it when it starts.
    let stale = Path::new("/dev/vmar/leftover");
    nix::sys::stat::mknod(
        stale,
        nix::sys::stat::SFlag::S_IFBLK,
        nix::sys::stat::Mode::from_bits_truncate(0o640),
        nix::sys::stat::makedev(253, 250),
    )
    .unwrap();

    let daemon = Daemon::start_with(dir.path(), &state, &socket);
    assert!(
        std::fs::symlink_metadata(stale).is_err(),
        "a /dev/vmar node that names no live vmar device survived vmard's start"
    );
    let states = device_states(&daemon);
    // db's image was rewritten in place: restored failed closed (its extents read as EIO),
    // never served as unchanged.
    assert_eq!(
        states,
        vec![
            ("base".to_string(), "active".to_string()),
            ("db".to_string(), "image-changed".to_string()),
            ("older".to_string(), "unmanaged".to_string()),
            ("web".to_string(), "active".to_string()),
        ],
    );
    let after: Vec<Value> = ["base", "web"]
        .iter()
        .map(|n| live_table(&daemon, n))
        .collect();
    assert_eq!(before, after, "restored tables differ");
    assert_same(&node("base"), &images[0]);
    assert_same(&node("web"), &images[1]);
    assert!(!node("junk").exists());
    // (Without a table it has no /dev/mapper node: ask device-mapper.)
    let older = std::process::Command::new("dmsetup")
        .args(["info", "vmar-older"])
        .output()
        .unwrap();
    assert!(
        older.status.success(),
        "an unrecorded device of an older vmar was removed"
    );
    run(&["remove", "vmar-older"]);

    // A restart with everything in place leaves the devices alone (same tables, still open).
    let open = File::open(node("web")).unwrap();
    let state = daemon.stop();
    let daemon = Daemon::start_with(dir.path(), &state, &socket);
    assert_eq!(live_table(&daemon, "web"), before[1]);
    drop(open);
    for name in ["base", "web", "db"] {
        assert!(daemon.json(&["remove", name]).0, "remove {name}");
    }
}

/// Reads all of `path` once with O_DIRECT, so every sector goes to the device (nothing comes
/// from, or stays in, the device's own page cache).
fn read_direct(path: &Path) -> usize {
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_DIRECT)
        .open(path)
        .unwrap_or_else(|e| panic!("open {} with O_DIRECT: {e}", path.display()));
    let mut buffer = vec![0u8; 128 * 1024];
    let aligned = buffer.as_ptr().align_offset(4096);
    let chunk = &mut buffer[aligned..aligned + 64 * 1024];
    let mut total = 0;
    loop {
        match file.read(chunk).unwrap() {
            0 => return total,
            n => total += n,
        }
    }
}

fn stats(daemon: &Daemon, args: &[&str]) -> Value {
    let mut all = vec!["stats"];
    all.extend_from_slice(args);
    let (ok, out) = daemon.json(&all);
    assert!(ok, "{out}");
    out
}

#[test]
#[ignore = "needs root and a kernel with device-mapper: run tools/kernel-test.py"]
fn real_stats_count_reads_by_class_and_cache_sharing() {
    let _clean = require_dm();
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(dir.path());
    let images = family(dir.path());
    capture_all(&daemon, &images[..2]);
    create(&daemon, "base", "base");
    create(&daemon, "web", "web");
    // Let udev finish probing the new devices, whose reads count too.
    let _ = std::process::Command::new("udevadm").arg("settle").status();
    let before = stats(&daemon, &["web"]);
    let web = &before["devices"][0];
    let mapped = web["mapped"].clone();
    let size = std::fs::metadata(&images[1]).unwrap().len();
    let class_sum = |v: &Value| {
        ["own", "redirected", "zero"]
            .iter()
            .map(|c| v[c].as_u64().unwrap())
            .sum::<u64>()
    };
    assert_eq!(class_sum(&mapped), size, "{web}");
    // web shares its first 180 blocks with base and owns the rest; some blocks are zero.
    for class in ["own", "redirected", "zero"] {
        assert!(mapped[class].as_u64().unwrap() > 0, "{class}: {web}");
    }
    // Target counts agree with the live table.
    let (_, status) = daemon.json(&["status", "web"]);
    let targets = &web["targets"];
    assert_eq!(
        targets["zero"].as_u64(),
        status["target_types"]["zero"].as_u64().or(Some(0)),
        "{web} {status}"
    );
    assert_eq!(
        targets["own"].as_u64().unwrap() + targets["redirected"].as_u64().unwrap(),
        status["target_types"]["linear"].as_u64().unwrap(),
        "{web} {status}"
    );

    // One full read: with block-sized areas (a small device), every byte is attributed to
    // the class that mapped it, exactly.
    assert_eq!(read_direct(&node("web")) as u64, size);
    let after = stats(&daemon, &["web"]);
    let web_after = &after["devices"][0];
    for class in ["own", "redirected", "zero"] {
        let read = web_after["read"]["by_class"][class].as_u64().unwrap()
            - web["read"]["by_class"][class].as_u64().unwrap();
        assert_eq!(
            read,
            mapped[class].as_u64().unwrap(),
            "{class}: {web_after}"
        );
    }
    assert_eq!(
        web_after["read"]["total"].as_u64().unwrap() - web["read"]["total"].as_u64().unwrap(),
        size
    );
    assert_eq!(web_after["read"]["estimated"], 0, "{web_after}");

    // The images live on tmpfs: every written page is cached and every page a table reads
    // is resident, so each device sees its whole non-zero mapping in the cache.
    let all = stats(&daemon, &[]);
    let devices = all["devices"].as_array().unwrap();
    assert_eq!(devices.len(), 2, "{all}");
    let mut visible = 0;
    for device in devices {
        let m = &device["mapped"];
        let data = m["own"].as_u64().unwrap() + m["redirected"].as_u64().unwrap();
        assert_eq!(device["cached"].as_u64().unwrap(), data, "{device}");
        visible += data;
    }
    let mut cached = 0;
    for image in all["images"].as_array().unwrap() {
        use std::os::unix::fs::MetadataExt;
        let path = image["path"].as_str().unwrap();
        let allocated = std::fs::metadata(path).unwrap().blocks() * 512;
        assert_eq!(image["cached"].as_u64().unwrap(), allocated, "{image}");
        cached += allocated;
    }
    let factor = all["sharing_factor"].as_f64().unwrap();
    assert!(
        (factor - visible as f64 / cached as f64).abs() < 1e-9,
        "{factor} vs {visible}/{cached}"
    );
    assert_eq!(
        all["read"]["total"].as_u64().unwrap(),
        devices
            .iter()
            .map(|d| d["read"]["total"].as_u64().unwrap())
            .sum::<u64>()
    );

    let (ok, out) = daemon.json(&["stats", "nosuch"]);
    assert!(!ok);
    assert_eq!(out["error"]["kind"], "unknown-device", "{out}");
    for name in ["base", "web"] {
        assert!(daemon.json(&["remove", name]).0);
    }
}

/// dm cookies (SysV semaphores keyed 0x0D4D....) that are still allocated.
fn dm_cookies() -> Vec<String> {
    std::fs::read_to_string("/proc/sysvipc/sem")
        .unwrap_or_default()
        .lines()
        .skip(1)
        .filter(|l| {
            l.split_whitespace()
                .next()
                .and_then(|k| k.parse::<i64>().ok())
                .is_some_and(|k| (k >> 16) & 0xffff == 0x0D4D)
        })
        .map(|l| {
            // With the semaphore's value, waiters and last pid: what tells a stale cookie.
            let semid: i32 = l.split_whitespace().nth(1).unwrap().parse().unwrap();
            // SAFETY: GETVAL, GETZCNT and GETPID take no pointer.
            let (value, zcnt, pid) = unsafe {
                (
                    nix::libc::semctl(semid, 0, nix::libc::GETVAL),
                    nix::libc::semctl(semid, 0, nix::libc::GETZCNT),
                    nix::libc::semctl(semid, 0, nix::libc::GETPID),
                )
            };
            format!("{l} value={value} zcnt={zcnt} pid={pid}")
        })
        .collect()
}

#[test]
#[ignore = "needs root and a kernel with device-mapper: run tools/kernel-test.py"]
fn real_kill_at_every_device_step_is_repaired_at_restart() {
    let _clean = require_dm();
    use vmar::fault::Step;
    let steps: &[(Step, u32, &[&str])] = &[
        (Step::CatalogCommit, 1, &["create", "web", "web"]),
        (Step::DmCreate, 1, &["create", "web", "web"]),
        (Step::DmLoad, 1, &["create", "web", "web"]),
        (Step::DmResume, 1, &["create", "web", "web"]),
        (Step::CatalogCommit, 2, &["create", "web", "web"]),
        (Step::DmLoad, 1, &["refresh", "base"]),
        (Step::DmSuspend, 1, &["refresh", "base"]),
        (Step::DmResume, 1, &["refresh", "base"]),
        (Step::CatalogCommit, 1, &["remove", "base"]),
        (Step::DmRemove, 1, &["remove", "base"]),
        (Step::CatalogCommit, 2, &["remove", "base"]),
    ];
    for &(step, nth, op) in steps {
        let step = format!("{step}#{nth}");
        let dir = tempfile::tempdir().unwrap();
        let images = family(dir.path());
        let state = dir.path().join("state");
        let socket = dir.path().join("run/vmard.sock");
        let daemon = Daemon::start_with(dir.path(), &state, &socket);
        capture_all(&daemon, &images[..2]);
        create(&daemon, "base", "base");
        // A clean stop stamps the index runs once they are settled (a few seconds old):
        // otherwise the next start stamps them, a catalog commit that catalog.commit#1 would
        // hit before the operation under test.
        std::thread::sleep(std::time::Duration::from_secs(3));
        assert!(daemon.terminate().success());
        // A reader holds base open across the crash, as a VM would.
        let reader = File::open(node("base")).unwrap();
        let faults = format!("{step}=kill");
        let faulty = Daemon::start_env(
            dir.path(),
            &state,
            &socket,
            &[],
            &[("VMAR_FAULTS", &faults)],
        );
        let (ok, out) = faulty.json(op);
        assert!(!ok, "{op:?} with {faults} answered: {out}");
        drop(faulty);
        let daemon = Daemon::start_with(dir.path(), &state, &socket);
        // Udev cookies the killed vmard left are released by the start, all of them.
        assert!(
            dm_cookies().is_empty(),
            "{op:?} {step}: cookies left after the restart: {:?}",
            dm_cookies()
        );
        for (name, st) in device_states(&daemon) {
            assert_eq!(st, "active", "{op:?} killed at {step}: {name} is {st}");
            let status = daemon.json(&["status", &name]).1;
            assert_eq!(status["live"]["suspended"], false, "{status}");
            let image = if name == "base" {
                &images[0]
            } else {
                &images[1]
            };
            assert_same(&node(&name), image);
        }
        drop(reader);
        for (name, _) in device_states(&daemon) {
            assert!(daemon.json(&["remove", &name]).0, "remove {name}");
        }
        drop(daemon);
        assert!(
            dm_cookies().is_empty(),
            "{op:?} {step}: cookies left: {:?}",
            dm_cookies()
        );
        let _ = std::process::Command::new("dmsetup")
            .args(["remove_all", "--force"])
            .output();
    }
}

#[test]
#[ignore = "needs root and a kernel with device-mapper: run tools/kernel-test.py"]
fn real_kernel_agrees_with_the_in_memory_one() {
    let _clean = require_dm();
    let dir = tempfile::tempdir().unwrap();
    let images = family(dir.path());
    // The in-memory kernel's vmard captures its own copies: the real one's hold on a file it
    // captured is an extra link another vmard's capture refuses.
    let sim_images_dir = dir.path().join("sim-images");
    std::fs::create_dir_all(&sim_images_dir).unwrap();
    let sim_images = family(&sim_images_dir);
    let real = Daemon::start_with(
        dir.path(),
        &dir.path().join("state-real"),
        &dir.path().join("real.sock"),
    );
    let sim_dir = dir.path().join("sim");
    std::fs::create_dir_all(&sim_dir).unwrap();
    let sim = Daemon::start_env(
        dir.path(),
        &dir.path().join("state-sim"),
        &dir.path().join("sim.sock"),
        &["--sim", sim_dir.join("kernel").to_str().unwrap()],
        &[],
    );
    // A table with each device named by the image file behind it, so that tables of the
    // two kernels (whose loop device numbers differ) compare.
    let by_image = |daemon: &Daemon, name: &str| -> Vec<Value> {
        let status = daemon.json(&["status", name, "--table"]).1;
        let stats = daemon.json(&["stats", name]).1;
        let files: std::collections::BTreeMap<String, String> = stats["images"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| {
                (
                    i["loop_device"].as_str().unwrap().to_string(),
                    // By file name: the two vmards read copies in two directories.
                    Path::new(i["path"].as_str().unwrap())
                        .file_name()
                        .unwrap()
                        .to_string_lossy()
                        .into_owned(),
                )
            })
            .collect();
        status["table"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| {
                let mut t = t.clone();
                if let Some(dev) = t["device"].as_str() {
                    t["device"] = Value::String(files[dev].clone());
                }
                t
            })
            .collect()
    };
    for (daemon, images) in [(&real, &images), (&sim, &sim_images)] {
        capture_all(daemon, images);
        for name in ["base", "web", "db", "other"] {
            create(daemon, name, name);
        }
    }
    for name in ["base", "web", "db", "other"] {
        assert_eq!(
            by_image(&real, name),
            by_image(&sim, name),
            "tables of {name}"
        );
    }
    assert_eq!(device_states(&real), device_states(&sim));
    // The same refusals: a busy device, a name taken, an unknown device.
    let reader = File::open(node("web")).unwrap();
    let sim_kernel = vmar::kernel::sim::SimKernel::open(&sim_dir.join("kernel")).unwrap();
    sim_kernel.open_device("web").unwrap();
    for args in [
        &["remove", "web"][..],
        &["create", "web", "web"],
        &["remove", "nosuch"],
    ] {
        let (a, b) = (real.json(args).1, sim.json(args).1);
        assert_eq!(
            a["error"]["kind"], b["error"]["kind"],
            "{args:?}: {a} vs {b}"
        );
    }
    for daemon in [&real, &sim] {
        let (ok, out) = daemon.json(&["remove", "--deferred", "web"]);
        assert!(ok, "{out}");
    }
    assert_eq!(device_states(&real), device_states(&sim));
    drop(reader);
    sim_kernel.close_device("web").unwrap();
    eventually("the deferred removal", || {
        device_states(&real) == device_states(&sim)
    });
}

#[test]
#[ignore = "needs root and a kernel with device-mapper: run tools/kernel-test.py"]
fn real_concurrent_changes_of_one_name_never_serve_the_wrong_image() {
    let _clean = require_dm();
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(dir.path());
    let images = family(dir.path());
    capture_all(&daemon, &images[..3]);
    for round in 0..6 {
        std::thread::scope(|scope| {
            let d = &daemon;
            let calls = [
                scope.spawn(move || d.json(&["create", "same", "web"])),
                scope.spawn(move || d.json(&["remove", "same"])),
                scope.spawn(move || d.json(&["create", "same", "db"])),
            ];
            for call in calls {
                let (_, out) = call.join().unwrap();
                if let Some(kind) = out["error"]["kind"].as_str() {
                    assert!(
                        ["device-exists", "unknown-device", "name-bound"].contains(&kind),
                        "round {round}: {out}"
                    );
                }
            }
        });
        for (name, state) in device_states(&daemon) {
            assert_eq!(state, "active", "round {round}: {name}");
            let status = daemon.json(&["status", &name]).1;
            let image = match status["image"].as_str().unwrap() {
                "web" => &images[1],
                "db" => &images[2],
                other => panic!("unexpected image {other}"),
            };
            assert_same(&node(&name), image);
        }
    }
    let (ok, _) = daemon.json(&["remove", "same"]);
    let _ = ok;
    assert!(dm_cookies().is_empty(), "cookies left: {:?}", dm_cookies());
}

/// Sectors read from block device `node` since boot (`/sys/dev/block/M:m/stat`, field 3).
fn sectors_read(node: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let rdev = std::fs::metadata(node).unwrap().rdev();
    let (major, minor) = (nix::sys::stat::major(rdev), nix::sys::stat::minor(rdev));
    let stat = std::fs::read_to_string(format!("/sys/dev/block/{major}:{minor}/stat")).unwrap();
    stat.split_whitespace().nth(2).unwrap().parse().unwrap()
}

/// Drops clean cached pages, so that what is read next comes from the devices.
fn drop_caches() {
    nix::unistd::sync();
    std::fs::write("/proc/sys/vm/drop_caches", "3").unwrap();
}

/// Bytes of block device (or file) `path` in the page cache, in `range` (bytes) or all.
fn cached(path: &Path, range: Option<(u64, u64)>) -> u64 {
    use std::io::{Seek, SeekFrom};
    let size = File::open(path).unwrap().seek(SeekFrom::End(0)).unwrap();
    let residency = vmar::sys::residency(path, size).unwrap();
    let page = residency.page_size;
    let (from, to) = range.unwrap_or((0, size));
    residency
        .pages
        .iter()
        .enumerate()
        .filter(|(i, p)| {
            let at = *i as u64 * page;
            at >= from && at < to && *p & 1 == 1
        })
        .count() as u64
        * page
}

/// Loop devices attached by the test, as the images' block devices; detached when dropped.
struct Lower(Vec<loopdev::LoopDevice>);

impl Lower {
    fn attach(files: &[PathBuf]) -> Lower {
        let control = loopdev::LoopControl::open().unwrap();
        Lower(
            files
                .iter()
                .map(|file| {
                    let device = control.next_free().unwrap();
                    device.with().read_only(true).attach(file).unwrap();
                    device
                })
                .collect(),
        )
    }

    fn node(&self, i: usize) -> PathBuf {
        self.0[i].path().unwrap()
    }
}

impl Drop for Lower {
    fn drop(&mut self) {
        for device in &self.0 {
            let _ = device.detach();
        }
    }
}

/// The loop devices whose backing file is block device `node` (by device number).
fn loops_over(node: &Path) -> Vec<String> {
    use std::os::unix::fs::MetadataExt;
    let rdev = std::fs::metadata(node).unwrap().rdev();
    let want = vmar::image::device_number(rdev);
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/sys/block").unwrap().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with("loop") || !entry.path().join("loop").exists() {
            continue;
        }
        let Ok(file) = File::open(format!("/dev/{name}")) else {
            continue;
        };
        if vmar::sys::loop_status(&file).and_then(|s| s.rdev) == want {
            found.push(name);
        }
    }
    found
}

/// `name`'s live table with every linear target's device replaced through `devices`, as
/// dmsetup table text.
fn table_text(daemon: &Daemon, name: &str, devices: &[(String, String)]) -> String {
    let (ok, out) = daemon.json(&["status", name, "--table"]);
    assert!(ok, "{out}");
    let mut text = String::new();
    for t in out["table"].as_array().unwrap() {
        let (start, len) = (t["start"].as_u64().unwrap(), t["len"].as_u64().unwrap());
        match t["type"].as_str().unwrap() {
            "zero" => text.push_str(&format!("{start} {len} zero\n")),
            "linear" => {
                let device = t["device"].as_str().unwrap();
                let (_, lower) = devices
                    .iter()
                    .find(|(vmar_loop, _)| vmar_loop == device)
                    .unwrap_or_else(|| panic!("{device} is no loop device of {devices:?}"));
                let offset = t["offset"].as_u64().unwrap();
                text.push_str(&format!("{start} {len} linear {lower} {offset}\n"));
            }
            other => panic!("unexpected target {other}"),
        }
    }
    text
}

fn device_number(node: &Path) -> String {
    use std::os::unix::fs::MetadataExt;
    let rdev = std::fs::metadata(node).unwrap().rdev();
    format!(
        "{}:{}",
        nix::sys::stat::major(rdev),
        nix::sys::stat::minor(rdev)
    )
}

/// Sectors read from each of `lower` once no read is in flight: the page cache's readahead
/// for one reader completes after its reads return, and must not count for the next.
fn settled_reads(lower: &[PathBuf]) -> Vec<u64> {
    let snapshot = || -> Vec<u64> { lower.iter().map(|l| sectors_read(l)).collect() };
    let in_flight = || {
        lower.iter().any(|l| {
            use std::os::unix::fs::MetadataExt;
            let rdev = std::fs::metadata(l).unwrap().rdev();
            let (major, minor) = (nix::sys::stat::major(rdev), nix::sys::stat::minor(rdev));
            std::fs::read_to_string(format!("/sys/dev/block/{major}:{minor}/inflight"))
                .unwrap()
                .split_whitespace()
                .any(|n| n != "0")
        })
    };
    let mut last = snapshot();
    eventually("reads of the block devices to settle", || {
        std::thread::sleep(Duration::from_millis(200));
        let now = snapshot();
        let settled = !in_flight() && now == last;
        last = now;
        settled
    });
    last
}

/// Reads all of `first`, then all of `second` (O_DIRECT, from a cold cache) and returns the
/// bytes read from each of `lower` while `second` was read.
fn second_reader_cost(first: &Path, second: &Path, lower: &[PathBuf]) -> Vec<u64> {
    drop_caches();
    read_direct(first);
    let before = settled_reads(lower);
    read_direct(second);
    settled_reads(lower)
        .iter()
        .zip(before)
        .map(|(after, b)| (after - b) * 512)
        .collect()
}

/// Images on block devices share the page cache like image files: the two images are guest
/// loop devices (as an LVM volume or an iSCSI disk would be), vmar reads them through its
/// own buffered loop devices, so the blocks `web` shares with `base`, once read through
/// `base`, cost no read of base's block device when read through `web`, and are cached once,
/// in base's block device's page cache. The same tables put directly over the block devices
/// (the path without loop devices) read those blocks from base's device again.
#[test]
#[ignore = "needs root and a kernel with device-mapper: run tools/kernel-test.py"]
fn real_block_device_images_share_the_page_cache() {
    let _clean = require_dm();
    let dir = tempfile::tempdir().unwrap();
    let files = family(dir.path());
    let lower = Lower::attach(&files[..2]);
    let lower_nodes = [lower.node(0), lower.node(1)];
    // A loop device someone else attached (autoclear, held open) over web's device through
    // its /dev node: vmar must find it by device number and use it.
    let control = loopdev::LoopControl::open().unwrap();
    let theirs = control.next_free().unwrap();
    theirs
        .with()
        .read_only(true)
        .autoclear(true)
        .attach(&lower_nodes[1])
        .unwrap();
    let theirs_number = format!("7:{}", theirs.minor().unwrap());
    // Captured through nodes of their own in the image root.
    let daemon = Daemon::start(dir.path());
    for (name, node) in ["base", "web"].iter().zip(&lower_nodes) {
        let alias = dir.path().join(format!("{name}.dev"));
        alias_node(node, &alias);
        let (ok, out) = daemon.json(&["capture", s(&alias), "--name", name]);
        assert!(ok, "{out}");
    }
    create(&daemon, "base", "base");
    create(&daemon, "web", "web");
    create(&daemon, "web2", "web");
    let _ = std::process::Command::new("udevadm").arg("settle").status();
    assert_same(&node("base"), &files[0]);
    assert_same(&node("web"), &files[1]);
    assert_same(&node("web2"), &files[1]);
    // One buffered loop device per block device: web's is the one found.
    let over: Vec<Vec<String>> = lower_nodes.iter().map(|l| loops_over(l)).collect();
    assert_eq!(over[0].len(), 1, "{over:?}");
    assert_eq!(over[1].len(), 1, "{over:?}");
    let vmar_loops: Vec<String> = over
        .iter()
        .map(|o| device_number(&PathBuf::from("/dev").join(&o[0])))
        .collect();
    assert_eq!(vmar_loops[1], theirs_number);
    for l in &over {
        let sys = PathBuf::from("/sys/block").join(&l[0]).join("loop");
        assert_eq!(
            std::fs::read_to_string(sys.join("dio")).unwrap().trim(),
            "0"
        );
    }
    for name in ["web", "web2"] {
        let (_, status) = daemon.json(&["status", name]);
        assert_eq!(status["state"], "active", "{status}");
    }
    let stats = stats(&daemon, &["web"]);
    let redirected = stats["devices"][0]["mapped"]["redirected"]
        .as_u64()
        .unwrap();
    let own = stats["devices"][0]["mapped"]["own"].as_u64().unwrap();
    assert!(redirected > 0 && own > 0, "{stats}");

    // Through vmar: web's redirected blocks come from base's device's page cache.
    let via_vmar = second_reader_cost(&node("base"), &node("web"), &lower_nodes);
    // Cached once: in base's device's cache; not in web's device's (its copy of the shared
    // blocks was never read), not in the dm devices' (O_DIRECT), not in vmar's loop devices'.
    let shared_range = Some((0, 180 * 4096));
    let base_cached = cached(&lower_nodes[0], shared_range);
    let web_cached = cached(&lower_nodes[1], shared_range);
    let elsewhere: u64 = [node("base"), node("web")]
        .iter()
        .chain(
            over.iter()
                .map(|o| PathBuf::from("/dev").join(&o[0]))
                .collect::<Vec<_>>()
                .iter(),
        )
        .map(|p| cached(p, None))
        .sum();
    // web2 reads everything from the cache: neither device is read.
    let before = settled_reads(&lower_nodes);
    read_direct(&node("web2"));
    let web2_cost: Vec<u64> = settled_reads(&lower_nodes)
        .iter()
        .zip(&before)
        .map(|(after, b)| (after - b) * 512)
        .collect();

    // The old path: the same tables directly over the block devices.
    let lower_numbers: Vec<(String, String)> = vmar_loops
        .iter()
        .zip(&lower_nodes)
        .map(|(v, l)| (v.clone(), device_number(l)))
        .collect();
    for name in ["base", "web"] {
        let table = table_text(&daemon, name, &lower_numbers);
        let status = std::process::Command::new("dmsetup")
            .args([
                "create",
                &format!("direct-{name}"),
                "--readonly",
                "--table",
                &table,
            ])
            .status()
            .unwrap();
        assert!(status.success(), "dmsetup create direct-{name}");
    }
    let direct = |name: &str| PathBuf::from(format!("/dev/mapper/direct-{name}"));
    eventually("direct device nodes", || {
        direct("base").exists() && direct("web").exists()
    });
    let _ = std::process::Command::new("udevadm").arg("settle").status();
    assert_same(&direct("web"), &files[1]);
    let via_direct = second_reader_cost(&direct("base"), &direct("web"), &lower_nodes);

    eprintln!(
        "KERNEL-TEST: block-device images, web read after base: {} B redirected, {} B own; \
         through vmar's loop devices base's device read {} B, web's {} B; web2 after them {} B \
         and {} B; directly over the devices base's read {} B, web's {} B. Shared blocks \
         cached: {} B in base's device, {} B in web's, {} B in dm and vmar loop devices",
        redirected,
        own,
        via_vmar[0],
        via_vmar[1],
        web2_cost[0],
        web2_cost[1],
        via_direct[0],
        via_direct[1],
        base_cached,
        web_cached,
        elsewhere
    );
    assert_eq!(
        via_vmar[0], 0,
        "shared blocks read again from base's device"
    );
    assert!(
        via_vmar[1] >= own,
        "web's own blocks come from its device: {via_vmar:?}"
    );
    assert_eq!(web2_cost, vec![0, 0], "a third reader reads nothing");
    assert!(base_cached >= redirected, "{base_cached} < {redirected}");
    assert_eq!(
        web_cached, 0,
        "web's copy of the shared blocks is cached too"
    );
    assert_eq!(elsewhere, 0, "a second copy above the block devices");
    assert!(
        via_direct[0] >= redirected,
        "without loop devices the shared blocks cost {} B of base's device, not >= {redirected}",
        via_direct[0]
    );
    for name in ["base", "web"] {
        let _ = std::process::Command::new("dmsetup")
            .args(["remove", &format!("direct-{name}")])
            .status();
    }
    for name in ["base", "web", "web2"] {
        assert!(daemon.json(&["remove", name]).0, "remove {name}");
    }
    drop(theirs);
    drop(lower);
}

/// Waits up to `seconds` until device `name` is `image-changed` because of `image`, with
/// `error` targets in its live table (the state is saved before the table is swapped).
fn wait_failed_closed(daemon: &Daemon, name: &str, image: &str, seconds: u64) -> bool {
    let deadline = Instant::now() + Duration::from_secs(seconds);
    while Instant::now() < deadline {
        let (_, status) = daemon.json(&["status", name]);
        let because = status["changed_images"]
            .as_array()
            .is_some_and(|c| c.iter().any(|i| i == image));
        if status["state"] == "image-changed"
            && because
            && status["target_types"]["error"].as_u64().unwrap_or(0) > 0
        {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// `dd if=/dev/zero of=TARGET bs=4096 count=1 conv=notrunc`: its output, and success.
fn dd_onto(target: &Path) -> (bool, String) {
    let out = std::process::Command::new("dd")
        .args(["if=/dev/zero", "bs=4096", "count=1", "conv=notrunc"])
        .arg(format!("of={}", target.display()))
        .output()
        .expect("dd runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Reads `len` bytes of `path` at `offset`.
fn read_range(path: &Path, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; len];
    File::open(path)?.read_exact_at(&mut buf, offset)?;
    Ok(buf)
}

/// Issue 18.1 on the real kernel: `dd conv=notrunc` onto an image that live devices read is
/// refused by the kernel (fanotify permission events answered by vmard), and the devices
/// keep serving the captured bytes; a writer that opened before the devices existed
/// overwrites 1 MiB of the canonical image: every device reading it goes `image-changed`
/// and its extents of that image fail with EIO (dm `error` targets swapped in while open),
/// while the rest of the device still reads.
#[test]
#[ignore = "needs root and a kernel with device-mapper: run tools/kernel-test.py"]
fn real_writes_to_served_images_are_refused_or_fail_closed() {
    let _clean = require_dm();
    // SAFETY: the guest runs these tests one at a time (--test-threads=1); nothing reads
    // the environment concurrently. vmard's decisions go to the guest log.
    unsafe { std::env::set_var("VMAR_TEST_LOG", "vmar::guard=debug,warn") };
    let dir = tempfile::tempdir().unwrap();
    let images = family(dir.path());
    let daemon = Daemon::start(dir.path());
    capture_all(&daemon, &images[..3]);
    let early = std::fs::OpenOptions::new()
        .write(true)
        .open(&images[0])
        .unwrap();
    for (name, image) in [("base", "base"), ("web", "web"), ("db", "db")] {
        create(&daemon, name, image);
    }
    let _ = std::process::Command::new("udevadm").arg("settle").status();
    // Refused by the kernel: nothing reaches the image.
    for image in &images[..2] {
        let (written, stderr) = dd_onto(image);
        assert!(!written, "dd onto served {} succeeded", image.display());
        assert!(
            stderr.contains("not permitted"),
            "dd failed otherwise: {stderr}"
        );
    }
    assert_same(&node("web"), &images[1]);
    assert_same(&node("base"), &images[0]);
    // Reading stays allowed.
    read_all(&images[0]);
    let held = File::open(node("web")).unwrap();

    // 1 MiB of the canonical image, overwritten through the early writer.
    use std::os::unix::fs::FileExt;
    early.write_all_at(&vec![0xab; 1 << 20], 0).unwrap();
    for name in ["base", "web", "db"] {
        assert!(
            wait_failed_closed(&daemon, name, "base", 10),
            "{name} not image-changed: {}",
            daemon.json(&["status", name]).1
        );
    }
    let (_, status) = daemon.json(&["status", "web", "--table"]);
    assert_eq!(
        status["changed_images"],
        serde_json::json!(["base"]),
        "{status}"
    );
    assert!(
        status["target_types"]["error"].as_u64().unwrap() > 0,
        "{status}"
    );
    // The open device's reads of base's extents fail; its own blocks (180..256) read.
    let mut whole = Vec::new();
    let failed = File::open(node("web"))
        .unwrap()
        .read_to_end(&mut whole)
        .expect_err("web served base's new bytes");
    assert_eq!(failed.raw_os_error(), Some(nix::libc::EIO), "{failed}");
    let web = std::fs::read(&images[1]).unwrap();
    assert_eq!(
        read_range(&node("web"), 180 * 4096, 76 * 4096).unwrap(),
        web[180 * 4096..256 * 4096]
    );
    drop(held);
    for name in ["base", "web", "db"] {
        let (ok, out) = daemon.json(&["remove", name]);
        assert!(ok, "{out}");
    }
}

/// Issue 18.1, block-device images (guest loop devices, writable as an LV would be): `dd`
/// onto the captured node (which fanotify cannot refuse: it reports no opens of device
/// nodes) is found by the device's write counters at the next check and failed closed; a
/// write while vmard is stopped is found at restart by sampled digests, so restore no
/// longer calls the device unchanged, and a new create over it is refused.
#[test]
#[ignore = "needs root and a kernel with device-mapper: run tools/kernel-test.py"]
fn real_block_device_images_written_in_place_are_refused_or_found() {
    let _clean = require_dm();
    // SAFETY: the guest runs these tests one at a time (--test-threads=1); nothing reads
    // the environment concurrently. vmard's decisions go to the guest log.
    unsafe { std::env::set_var("VMAR_TEST_LOG", "vmar::guard=debug,warn") };
    let dir = tempfile::tempdir().unwrap();
    let files = family(dir.path());
    let original = std::fs::read(&files[0]).unwrap();
    let control = loopdev::LoopControl::open().unwrap();
    let lower: Vec<loopdev::LoopDevice> = files[..2]
        .iter()
        .map(|file| {
            let device = control.next_free().unwrap();
            device.with().attach(file).unwrap();
            device
        })
        .collect();
    let lower_nodes: Vec<PathBuf> = lower.iter().map(|l| l.path().unwrap()).collect();
    let daemon = Daemon::start(dir.path());
    let mut aliases = Vec::new();
    for (name, node) in ["base", "web"].iter().zip(&lower_nodes) {
        let alias = dir.path().join(format!("{name}.dev"));
        alias_node(node, &alias);
        let (ok, out) = daemon.json(&["capture", s(&alias), "--name", name]);
        assert!(ok, "{out}");
        aliases.push(alias);
    }
    create(&daemon, "web", "web");
    // fanotify reports opens of regular files and directories only, never of device nodes,
    // so the kernel cannot be asked to refuse this one: dd writes, and the device's write
    // counters find it at the next check.
    let (written, stderr) = dd_onto(&aliases[0]);
    assert!(written, "{stderr}");
    daemon.signal(nix::sys::signal::Signal::SIGHUP);
    assert!(
        wait_failed_closed(&daemon, "web", "base", 10),
        "{}",
        daemon.json(&["status", "web"]).1
    );
    let mut whole = Vec::new();
    assert!(
        File::open(node("web"))
            .unwrap()
            .read_to_end(&mut whole)
            .is_err()
    );
    let (ok, out) = daemon.json(&["remove", "web"]);
    assert!(ok, "{out}");
    let write_all = |node: &Path, data: &[u8]| {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(node).unwrap();
        f.write_all_at(data, 0).unwrap();
        f.sync_all().unwrap();
    };
    write_all(&lower_nodes[0], &original);
    drop(daemon);

    // Written while vmard is stopped.
    let daemon = Daemon::start(dir.path());
    create(&daemon, "solo", "web");
    drop(daemon);
    write_all(&lower_nodes[1], &vec![0x5a; 4096 * 256]);
    let daemon = Daemon::start(dir.path());
    let (_, status) = daemon.json(&["status", "solo"]);
    assert_eq!(status["state"], "image-changed", "{status}");
    let (ok, out) = daemon.json(&["create", "solo2", "web"]);
    assert!(!ok && out["error"]["kind"] == "image-changed", "{out}");
    let (ok, out) = daemon.json(&["remove", "solo"]);
    assert!(ok, "{out}");
    drop(daemon);
    for device in lower {
        let _ = device.detach();
    }
}

#[test]
#[ignore = "needs root and a kernel with device-mapper: run tools/kernel-test.py"]
fn real_deleted_images_are_held_and_restored_after_reboot() {
    let _clean = require_dm();
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("vmard.sock");
    let daemon = Daemon::start(dir.path());
    let images = family(dir.path());
    capture_all(&daemon, &images[..2]);
    let want: Vec<Vec<u8>> = images[..2]
        .iter()
        .map(|p| std::fs::read(p).unwrap())
        .collect();
    create(&daemon, "base", "base");
    create(&daemon, "web", "web");
    let reads_from = |daemon: &Daemon, name: &str| {
        let (ok, status) = daemon.json(&["status", name]);
        assert!(ok, "{status}");
        status["reads_from"].clone()
    };
    // Nova's image cache manager deletes the _base files once the disks back onto the
    // devices.
    std::fs::remove_file(&images[0]).unwrap();
    std::fs::remove_file(&images[1]).unwrap();
    // A new device of a deleted image: the loop devices attached before are found by device
    // and inode (their backing_file now ends in "(deleted)") and reused.
    create(&daemon, "web2", "web");
    assert_eq!(reads_from(&daemon, "web2"), reads_from(&daemon, "web"));
    assert_eq!(read_all(&node("web2")), want[1]);
    assert!(daemon.json(&["remove", "web2"]).0);
    let (ok, listed) = daemon.json(&["images"]);
    assert!(ok, "{listed}");
    let base = &listed["images"][0]["file"];
    assert_eq!(base["state"], "gone", "{listed}");
    assert!(base["hold"].is_string(), "{listed}");
    assert_eq!(
        base["kept_by"]["devices"],
        serde_json::json!(["base", "web"])
    );
    let state = daemon.stop();

    // A reboot: no device survives, and with them the loop devices and the kernel's last
    // references to the deleted files, but for vmar's holds.
    let out = std::process::Command::new("dmsetup")
        .args(["remove_all", "--force"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let ours = |files: &[String]| {
        files
            .iter()
            .filter(|f| f.starts_with(s(dir.path())))
            .cloned()
            .collect::<Vec<_>>()
    };
    eventually("the loop devices to go", || {
        ours(&loop_backing_files()).is_empty()
    });
    let daemon = Daemon::start_with(dir.path(), &state, &socket);
    assert_eq!(
        device_states(&daemon),
        vec![
            ("base".to_string(), "active".to_string()),
            ("web".to_string(), "active".to_string()),
        ],
    );
    assert_eq!(read_all(&node("base")), want[0], "base after the reboot");
    assert_eq!(read_all(&node("web")), want[1], "web after the reboot");
    let backing = ours(&loop_backing_files());
    assert!(
        !backing.is_empty() && backing.iter().all(|f| f.contains("/holds/")),
        "{backing:?}"
    );
    // Nothing reads them any more, and forgotten nothing can: the holds go.
    for name in ["base", "web"] {
        assert!(daemon.json(&["remove", name]).0, "remove {name}");
    }
    for name in ["web", "base"] {
        assert!(daemon.json(&["forget", name]).0, "forget {name}");
    }
    let left: Vec<_> = std::fs::read_dir(state.join("holds"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

#[test]
#[ignore = "needs root and a kernel with device-mapper: run tools/kernel-test.py"]
fn real_a_kill_while_waiting_for_udev_leaves_no_cookie_after_the_restart() {
    let _clean = require_dm();
    let udev = |what: &str| {
        let status = std::process::Command::new("udevadm")
            .args(["control", what])
            .status()
            .unwrap();
        assert!(status.success(), "udevadm control {what}");
    };
    struct Resume;
    impl Drop for Resume {
        fn drop(&mut self) {
            let _ = std::process::Command::new("udevadm")
                .args(["control", "--start-exec-queue"])
                .status();
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let images = family(dir.path());
    let state = dir.path().join("state");
    let socket = dir.path().join("run/vmard.sock");
    let daemon = Daemon::start_with(dir.path(), &state, &socket);
    capture_all(&daemon, &images[..2]);
    create(&daemon, "base", "base");
    create(&daemon, "web", "web");
    // udev holds its events (a slow or busy udev): vmard's removal of web waits for it, and
    // vmard is killed there, as systemd or the OOM killer would.
    udev("--stop-exec-queue");
    let _resume = Resume;
    let remover = {
        let socket = socket.clone();
        std::thread::spawn(move || common::vmarctl(&socket, &["remove", "web"]))
    };
    let waiting = |cookies: &[String]| cookies.iter().any(|c| !c.contains("zcnt=0"));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !waiting(&dm_cookies()) {
        assert!(
            std::time::Instant::now() < deadline,
            "vmard never waited for udev: {:?}",
            dm_cookies()
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    daemon.stop();
    let _ = remover.join();
    let left = dm_cookies();
    assert_eq!(left.len(), 1, "the killed vmard's cookie: {left:?}");
    assert!(left[0].contains("zcnt=0"), "{left:?}");
    // The restart needs no udev (web's removal reached the kernel; base is unchanged) and
    // releases the cookie nobody will wait for, although udev has not completed it.
    let daemon = Daemon::start_with(dir.path(), &state, &socket);
    assert!(
        dm_cookies().is_empty(),
        "cookies left after the restart: {:?} (before: {left:?})",
        dm_cookies()
    );
    udev("--start-exec-queue");
    let _ = std::process::Command::new("udevadm").arg("settle").status();
    assert_eq!(
        device_states(&daemon),
        [("base".to_string(), "active".to_string())]
    );
    assert!(daemon.json(&["remove", "base"]).0);
    assert!(dm_cookies().is_empty(), "cookies left: {:?}", dm_cookies());
}

/// Reads blocks `blocks` of `path` with O_DIRECT, one 4 KiB read each.
fn read_blocks_direct(path: &Path, blocks: impl IntoIterator<Item = u64>) {
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_DIRECT)
        .open(path)
        .unwrap_or_else(|e| panic!("open {} with O_DIRECT: {e}", path.display()));
    let mut buffer = vec![0u8; 8192];
    let aligned = buffer.as_ptr().align_offset(4096);
    let chunk = &mut buffer[aligned..aligned + 4096];
    for b in blocks {
        file.read_at(chunk, b * 4096).unwrap();
    }
}

/// Blocks of the working set of `name`'s image, phase boot.
fn working_set(daemon: &Daemon, name: &str) -> std::collections::BTreeSet<u64> {
    ok(daemon, &["working-set", name, "--extents"])["sets"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["phase"] == "boot")
        .flat_map(|s| s["extents"].as_array().unwrap().clone())
        .flat_map(|e| {
            let start = e[0].as_u64().unwrap();
            start..start + e[1].as_u64().unwrap()
        })
        .collect()
}

#[test]
#[ignore = "needs root and a kernel with device-mapper: run tools/kernel-test.py"]
fn real_working_sets_are_recorded_from_dm_stats_and_warmed() {
    let _clean = require_dm();
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(dir.path());
    let images = family(dir.path());
    capture_all(&daemon, &images[..3]);
    create(&daemon, "web", "web");
    create(&daemon, "db", "db");
    let _ = std::process::Command::new("udevadm").arg("settle").status();
    // What was read before (udev's probing, if any) is in the first recording.
    ok(&daemon, &["record", "web", "--replace"]);
    let before = working_set(&daemon, "web");
    // A "boot" of web: blocks 0..30 (base's shared ones, holes and zeros among them) and
    // 200..210 (its own).
    let boot: Vec<u64> = (0..30).chain(200..210).collect();
    read_blocks_direct(&node("web"), boot.iter().copied());
    ok(&daemon, &["record", "web", "--replace"]);
    let set = working_set(&daemon, "web");
    // Zero blocks (below 180, where web is base's: holes and written zeros, i % 10 in 0..=2)
    // are never in a set; the images are on tmpfs, so every other block read is cached and
    // kept.
    let data: std::collections::BTreeSet<u64> = boot
        .iter()
        .copied()
        .filter(|b| *b >= 180 || b % 10 > 2)
        .collect();
    assert!(data.is_subset(&set), "{data:?} not in {set:?}");
    assert!(
        set.iter().all(|b| data.contains(b) || before.contains(b)),
        "{set:?} beyond {data:?} and {before:?}"
    );
    // db reads the same shared blocks; warming both reads each canonical block once: all
    // cached here (tmpfs), so nothing is read, and the figures add up.
    read_blocks_direct(&node("db"), 0..30);
    ok(&daemon, &["record", "db", "--replace"]);
    let warm = ok(&daemon, &["warm", "web", "db"]);
    let union = warm["union_bytes"].as_u64().unwrap();
    assert!(warm["shared_bytes"].as_u64().unwrap() > 0, "{warm}");
    assert_eq!(warm["cached_bytes"].as_u64().unwrap(), union, "{warm}");
    assert_eq!(warm["read_bytes"], 0, "{warm}");
    for name in ["web", "db"] {
        ok(&daemon, &["remove", name]);
    }
}
