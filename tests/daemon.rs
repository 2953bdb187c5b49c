//! Integration tests through vmard and vmarctl, each with its own state dir and socket.

mod common;

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{Block, Daemon, s, vmarctl, write_image};
use serde_json::Value;

/// Three images: a base, a derived one sharing most of it, and one sharing a little.
fn three_images(dir: &Path) -> Vec<PathBuf> {
    let base: Vec<Block> = (0..64)
        .map(|i| match i % 8 {
            0 => Block::Hole,
            1 => Block::Zero,
            _ => Block::Shared(u8::try_from(i).unwrap()),
        })
        .collect();
    let mut derived = base.clone();
    for (i, block) in derived.iter_mut().enumerate().skip(40) {
        *block = Block::Unique(i as u64);
    }
    derived.extend((0..32).map(|_| Block::Hole));
    let mut other: Vec<Block> = (0..48).map(|i| Block::Unique(1000 + i)).collect();
    other[10] = Block::Shared(2);
    other[11] = Block::Shared(3);
    let paths = vec![
        dir.join("base.raw"),
        dir.join("derived.raw"),
        dir.join("other.raw"),
    ];
    write_image(&paths[0], &base, 0);
    write_image(&paths[1], &derived, 0);
    write_image(&paths[2], &other, 2048);
    paths
}

fn image_names(list: &Value) -> Vec<String> {
    list["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["name"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn capture_map_table_verify_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(dir.path());
    let images = three_images(dir.path());
    let args: Vec<&str> = std::iter::once("capture")
        .chain(images.iter().map(|p| s(p)))
        .collect();
    let (ok, captured) = daemon.json(&args);
    assert!(ok, "{captured}");
    assert_eq!(captured.as_array().unwrap().len(), 3);
    for c in captured.as_array().unwrap() {
        assert_eq!(c["result"]["status"], "captured", "{c}");
    }

    let (ok, list) = daemon.json(&["images"]);
    assert!(ok);
    assert_eq!(image_names(&list), ["base", "derived", "other"]);

    let (ok, map) = daemon.json(&["map", "derived", "--extents"]);
    assert!(ok, "{map}");
    let summary = &map["summary"];
    // Blocks 0..40 of derived equal base's: all non-zero ones redirect there.
    assert_eq!(summary["redirected_to_other_images"], 30);
    assert_eq!(summary["own_blocks"], 24);
    assert_eq!(summary["zero_blocks"], 96 - 54);
    assert_eq!(map["references"][0]["name"], "base");
    assert!(!map["extents"].as_array().unwrap().is_empty());

    // The table is deterministic, tiles the device and uses the given devices.
    let table_args = [
        "table",
        "derived",
        "--device",
        "base=/dev/loop7",
        "--device",
        "derived=7:8",
    ];
    let first = daemon.ctl(&table_args);
    let second = daemon.ctl(&table_args);
    assert!(first.status.success());
    assert_eq!(first.stdout, second.stdout);
    let text = String::from_utf8(first.stdout).unwrap();
    let mut next = 0;
    for line in text.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        assert_eq!(fields[0].parse::<u64>().unwrap(), next, "{text}");
        next += fields[1].parse::<u64>().unwrap();
        match fields[2] {
            "zero" => assert_eq!(fields.len(), 3),
            "linear" => assert!(fields[3] == "/dev/loop7" || fields[3] == "7:8", "{line}"),
            other => panic!("unexpected target {other}"),
        }
    }
    assert_eq!(next, 96 * 8);
    let placeholder = String::from_utf8(daemon.ctl(&["table", "derived"]).stdout).unwrap();
    assert!(placeholder.contains("linear loop:base "), "{placeholder}");

    for name in ["base", "derived", "other"] {
        let (ok, report) = daemon.json(&["verify", name]);
        assert!(ok, "{report}");
        assert_eq!(report["ok"], true);
    }

    // Capturing again is a no-op.
    let (ok, again) = daemon.json(&["capture", s(&images[1])]);
    assert!(ok);
    assert_eq!(again[0]["result"]["status"], "unchanged");
}

#[test]
fn bad_input_gives_clear_errors_and_keeps_the_catalog() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(dir.path());
    let images = three_images(dir.path());
    assert!(daemon.ctl(&["capture", s(&images[0])]).status.success());
    let odd = dir.path().join("odd.raw");
    std::fs::write(&odd, vec![1u8; 1000]).unwrap();
    let cases: Vec<(Vec<String>, &str, &str)> = vec![
        (
            vec!["capture".into(), s(&dir.path().join("missing.raw")).into()],
            "io",
            "missing.raw",
        ),
        (
            vec!["capture".into(), s(dir.path()).into()],
            "not-an-image",
            "not a regular file",
        ),
        (
            vec!["capture".into(), s(&odd).into()],
            "unaligned-size",
            "multiple of 512",
        ),
        (
            vec![
                "capture".into(),
                s(&images[1]).into(),
                "--name".into(),
                "base".into(),
            ],
            "name-taken",
            "already used",
        ),
        (
            vec![
                "capture".into(),
                s(&images[1]).into(),
                "--name".into(),
                "a/b".into(),
            ],
            "invalid-name",
            "invalid name",
        ),
        (
            vec!["map".into(), "nosuch".into()],
            "unknown-image",
            "no image named",
        ),
        (
            vec!["verify".into(), "nosuch".into()],
            "unknown-image",
            "no image named",
        ),
        (
            vec!["table".into(), "../etc".into()],
            "invalid-name",
            "invalid name",
        ),
        (
            vec!["stats".into(), "../dm-0".into()],
            "invalid-name",
            "invalid name",
        ),
        (
            vec![
                "table".into(),
                "base".into(),
                "--device".into(),
                "base=/etc/passwd x".into(),
            ],
            "protocol",
            "must be a /dev path",
        ),
    ];
    for (args, kind, text) in cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (ok, value) = daemon.json(&args);
        assert!(!ok, "{args:?} succeeded: {value}");
        let error = if value.is_array() {
            value[0]["error"].clone()
        } else {
            value["error"].clone()
        };
        assert_eq!(error["kind"], kind, "{args:?}: {value}");
        assert!(
            error["message"].as_str().unwrap().contains(text),
            "{args:?}: {value}"
        );
        // Without --json the error goes to stderr.
        let out = daemon.ctl(&args);
        assert!(!out.status.success());
        assert!(String::from_utf8_lossy(&out.stderr).contains(text));
    }
    let (_, list) = daemon.json(&["images"]);
    assert_eq!(image_names(&list), ["base"]);
    assert_eq!(daemon.json(&["verify", "base"]).1["ok"], true);
}

#[test]
fn changed_images_are_refused_until_recaptured() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(dir.path());
    let images = three_images(dir.path());
    for image in &images[..2] {
        assert!(daemon.ctl(&["capture", s(image)]).status.success());
    }
    let before = daemon.json(&["map", "base", "--extents"]).1;
    // Change one block of the base image in place: derived redirects into it.
    write_image(&images[0], &[Block::Unique(77)], 0);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&images[0])
        .unwrap()
        .set_len(64 * 4096)
        .unwrap();
    let (ok, out) = daemon.json(&["capture", s(&images[0])]);
    assert!(!ok);
    assert_eq!(out[0]["error"]["kind"], "image-changed", "{out}");
    assert!(
        out[0]["error"]["message"]
            .as_str()
            .unwrap()
            .contains("--recapture")
    );
    for name in ["base", "derived"] {
        let (ok, out) = daemon.json(&["verify", name]);
        assert!(!ok);
        assert_eq!(out["error"]["kind"], "image-changed", "{out}");
    }
    // Refused means untouched.
    assert_eq!(daemon.json(&["map", "base", "--extents"]).1, before);

    let (ok, out) = daemon.json(&["capture", "--recapture", s(&images[0])]);
    assert!(ok, "{out}");
    assert_eq!(out[0]["result"]["status"], "recaptured");
    for name in ["base", "derived"] {
        let (ok, out) = daemon.json(&["verify", name]);
        assert!(ok, "{out}");
    }
    // Base now holds one unique block and holes: derived's blocks became its own.
    let derived = daemon.json(&["map", "derived"]).1;
    assert_eq!(derived["summary"]["redirected_to_other_images"], 0);
    assert_eq!(derived["summary"]["own_blocks"], 54);
}

#[test]
fn a_write_hidden_behind_a_restored_mtime_is_caught() {
    // A block changes content while size and modification time are kept (a restored mtime):
    // the inode change time gives it away, so verify (and create) refuse the image.
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(dir.path());
    let images = three_images(dir.path());
    for image in &images[..2] {
        assert!(daemon.ctl(&["capture", s(image)]).status.success());
    }
    let path = &images[1];
    let meta = std::fs::metadata(path).unwrap();
    let mut data = std::fs::read(path).unwrap();
    data[5 * 4096 + 17] ^= 0xff;
    std::fs::write(path, &data).unwrap();
    let mtime = nix::sys::time::TimeSpec::new(
        std::os::unix::fs::MetadataExt::mtime(&meta),
        std::os::unix::fs::MetadataExt::mtime_nsec(&meta),
    );
    nix::sys::stat::utimensat(
        None,
        path.as_path(),
        &mtime,
        &mtime,
        nix::sys::stat::UtimensatFlags::FollowSymlink,
    )
    .unwrap();
    let (ok, report) = daemon.json(&["verify", "derived"]);
    assert!(!ok, "{report}");
    assert_eq!(report["error"]["kind"], "image-changed", "{report}");
    assert!(
        report["error"]["message"]
            .as_str()
            .unwrap()
            .contains("inode change time"),
        "{report}"
    );
}

#[test]
fn vmarctl_without_daemon_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("none.sock");
    let out = vmarctl(&socket, &["images"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("cannot reach vmard"), "{stderr}");
    assert!(stderr.contains("is vmard running"), "{stderr}");
    let out = vmarctl(&socket, &["--json", "images"]);
    let value: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(value["error"]["kind"], "daemon-unavailable");
}

#[test]
fn a_crash_during_capture_leaves_the_catalog_intact() {
    let dir = tempfile::tempdir().unwrap();
    let images = three_images(dir.path());
    let daemon = Daemon::start(dir.path());
    assert!(daemon.ctl(&["capture", s(&images[0])]).status.success());
    let before = daemon.json(&["images"]).1;

    // A large dense image, so the capture is still running when vmard is killed.
    let big = dir.path().join("big.raw");
    let blocks: Vec<Block> = (0..64 * 1024).map(|i| Block::Unique(i + 50_000)).collect();
    write_image(&big, &blocks, 0);
    // Raw protocol client, to see the first progress line before killing the daemon.
    let mut stream = std::os::unix::net::UnixStream::connect(&daemon.socket).unwrap();
    use std::io::Write;
    writeln!(
        stream,
        "{}",
        serde_json::json!({"op": "capture", "path": big, "name": null, "recapture": false})
    )
    .unwrap();
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    assert!(line.contains("\"progress\""), "{line}");
    let state = daemon.stop();

    let daemon = Daemon::start_with(dir.path(), &state, &dir.path().join("run/vmard.sock"));
    let after = daemon.json(&["images"]).1;
    assert_eq!(before, after, "a killed capture must leave no trace");
    assert_eq!(daemon.json(&["verify", "base"]).1["ok"], true);
    let (ok, out) = daemon.json(&["capture", s(&big)]);
    assert!(ok, "{out}");
    assert_eq!(daemon.json(&["verify", "big"]).1["ok"], true);
}

#[test]
fn other_users_are_refused() {
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("skipped: needs root to run a client as another user");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let daemon = Daemon::start(dir.path());
    let mode = std::fs::metadata(&daemon.socket)
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "socket is for root only by default");
    // Open the socket file so that only SO_PEERCRED stands in the way.
    std::fs::set_permissions(&daemon.socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    std::fs::set_permissions(
        dir.path().join("run"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(env!("CARGO_BIN_EXE_vmarctl"))
        .arg("--socket")
        .arg(&daemon.socket)
        .args(["--json", "images"])
        .output()
        .expect("setpriv runs");
    let value: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|_| {
        panic!(
            "no JSON: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    assert!(!out.status.success());
    assert_eq!(value["error"]["kind"], "permission-denied", "{value}");
}

#[test]
fn malformed_requests_are_answered_with_protocol_errors() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(dir.path());
    for request in [
        "not json",
        r#"{"op":"explode"}"#,
        r#"{"op":"capture","path":"relative.raw"}"#,
    ] {
        let mut stream = std::os::unix::net::UnixStream::connect(&daemon.socket).unwrap();
        writeln!(stream, "{request}").unwrap();
        let mut line = String::new();
        BufReader::new(stream).read_line(&mut line).unwrap();
        let reply: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(reply["type"], "error", "{request}: {reply}");
        assert_eq!(reply["kind"], "protocol", "{request}: {reply}");
    }
    // A name is checked as the request is read, and refused as the name it is, whichever
    // request carries it (a client other than vmarctl sends anything).
    for request in [
        r#"{"op":"verify","name":"a/b"}"#,
        r#"{"op":"create","name":"../x","image":"base"}"#,
        r#"{"op":"stats","name":".hidden"}"#,
        r#"{"op":"warm","names":["ok","no way"]}"#,
        r#"{"op":"capture","path":"/x.raw","name":"-n"}"#,
    ] {
        let mut stream = std::os::unix::net::UnixStream::connect(&daemon.socket).unwrap();
        writeln!(stream, "{request}").unwrap();
        let mut line = String::new();
        BufReader::new(stream).read_line(&mut line).unwrap();
        let reply: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(reply["kind"], "invalid-name", "{request}: {reply}");
        let message = reply["message"].as_str().unwrap();
        assert!(message.starts_with("invalid name \""), "{request}: {reply}");
    }
    // The daemon is still serving.
    assert!(daemon.ctl(&["ping"]).status.success());
}

/// Captures a block device: a read-only loop device over an image file (root only).
#[test]
fn loop_capture_block_device() {
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("skipped: needs root for a loop device");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let images = three_images(dir.path());
    let out = Command::new("losetup")
        .args(["--find", "--show", "--read-only"])
        .arg(&images[1])
        .output()
        .expect("losetup runs");
    if !out.status.success() {
        eprintln!(
            "skipped: no loop device: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        return;
    }
    let device = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let detach = scopeguard(&device);
    let daemon = Daemon::start_args(
        dir.path(),
        &dir.path().join("state"),
        &dir.path().join("vmard.sock"),
        &["--image-root", "/dev"],
    );
    assert!(daemon.ctl(&["capture", s(&images[0])]).status.success());
    let (ok, out) = daemon.json(&["capture", &device, "--name", "derived-dev"]);
    assert!(ok, "{out}");
    let image = &out[0]["result"]["image"];
    assert_eq!(image["size"], 96 * 4096);
    // Holes read as zeros through a device: same map as the file would get.
    assert_eq!(image["summary"]["redirected_to_other_images"], 30);
    assert_eq!(daemon.json(&["verify", "derived-dev"]).1["ok"], true);
    drop(detach);
}

/// Detaches a loop device when dropped.
fn scopeguard(device: &str) -> impl Drop + '_ {
    struct Detach<'a>(&'a str);
    impl Drop for Detach<'_> {
        fn drop(&mut self) {
            let _ = Command::new("losetup").args(["-d", self.0]).status();
        }
    }
    Detach(device)
}

#[test]
fn only_files_under_image_roots_are_captured() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("images");
    let outside = dir.path().join("private");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::create_dir_all(&outside).unwrap();
    write_image(&root.join("ok.raw"), &[Block::Unique(1)], 0);
    write_image(&outside.join("secret.raw"), &[Block::Unique(2)], 0);
    std::os::unix::fs::symlink(outside.join("secret.raw"), root.join("link.raw")).unwrap();
    let daemon = Daemon::start_args(
        &root,
        &dir.path().join("state"),
        &dir.path().join("vmard.sock"),
        &[],
    );
    assert!(daemon.json(&["capture", s(&root.join("ok.raw"))]).0);
    for path in [
        outside.join("secret.raw"),
        root.join("link.raw"),
        root.join("../private/secret.raw"),
    ] {
        let (ok, out) = daemon.json(&["capture", s(&path)]);
        assert!(!ok, "{path:?} was captured");
        assert_eq!(out[0]["error"]["kind"], "outside-image-roots", "{out}");
    }
    let (_, list) = daemon.json(&["images"]);
    assert_eq!(image_names(&list), ["ok"]);
}

#[test]
fn a_lost_or_damaged_catalog_is_refused_and_recovered_from_its_backup() {
    let dir = tempfile::tempdir().unwrap();
    let images = three_images(dir.path());
    let state = dir.path().join("state");
    let socket = dir.path().join("run/vmard.sock");
    let daemon = Daemon::start_with(dir.path(), &state, &socket);
    for image in &images {
        assert!(daemon.ctl(&["capture", s(image)]).status.success());
    }
    let (_, before) = daemon.json(&["map", "other", "--extents"]);
    daemon.stop();
    let catalog = state.join("catalog.redb");
    let start = |args: &[&str]| {
        common::vmard(dir.path(), &state, &socket, args)
            .output()
            .unwrap()
    };
    for damage in ["empty", "missing", "garbage"] {
        let good = std::fs::read(&catalog).unwrap();
        match damage {
            "empty" => std::fs::write(&catalog, b"").unwrap(),
            "missing" => std::fs::remove_file(&catalog).unwrap(),
            _ => std::fs::write(&catalog, vec![0x5a; 4096]).unwrap(),
        }
        let runs = std::fs::read_dir(state.join("index")).unwrap().count();
        let out = start(&[]);
        assert!(!out.status.success(), "{damage} catalog accepted");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("--recover"), "{damage}: {stderr}");
        // Nothing was deleted on the way.
        assert_eq!(
            std::fs::read_dir(state.join("index")).unwrap().count(),
            runs
        );
        std::fs::write(&catalog, good).unwrap();
    }
    // Rebuilt from the backup: the same images in the same order, the same maps.
    std::fs::remove_file(&catalog).unwrap();
    let daemon = Daemon::start_args(dir.path(), &state, &socket, &["--recover"]);
    let (_, list) = daemon.json(&["images"]);
    assert_eq!(image_names(&list), ["base", "derived", "other"]);
    let (_, after) = daemon.json(&["map", "other", "--extents"]);
    assert_eq!(before["extents"], after["extents"]);
    assert_eq!(before["summary"], after["summary"]);
    let broken = std::fs::read_dir(&state)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("broken-"))
        .count();
    assert!(broken >= 1, "what was left should be kept aside");
}

#[test]
fn a_damaged_index_run_is_found_and_rebuilt() {
    let dir = tempfile::tempdir().unwrap();
    let images = three_images(dir.path());
    let daemon = Daemon::start(dir.path());
    assert!(daemon.ctl(&["capture", s(&images[0])]).status.success());
    let state = daemon.stop();
    // Flip bits in the middle of every run (not of the digest lists next to them, which the
    // rebuild reads).
    for entry in std::fs::read_dir(state.join("index")).unwrap().flatten() {
        if !entry.file_name().to_string_lossy().starts_with("run-") {
            continue;
        }
        let mut bytes = std::fs::read(entry.path()).unwrap();
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0xff;
        std::fs::write(entry.path(), bytes).unwrap();
    }
    let daemon = Daemon::start(dir.path());
    let damaged: Vec<_> = std::fs::read_dir(state.join("index"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("damaged-"))
        .collect();
    assert_eq!(
        damaged.len(),
        1,
        "the damaged run was not detected and kept aside"
    );
    // The derived image still finds base's blocks: the index was rebuilt, not trusted.
    assert!(daemon.ctl(&["capture", s(&images[1])]).status.success());
    let (_, map) = daemon.json(&["map", "derived"]);
    assert!(
        map["summary"]["redirected_blocks"].as_u64().unwrap() > 0,
        "{map}"
    );
    let (ok, report) = daemon.json(&["verify", "derived"]);
    assert!(ok, "{report}");
}

#[test]
fn container_images_are_refused_unless_forced() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(dir.path());
    let qcow2 = dir.path().join("web.qcow2");
    let mut bytes = b"QFI\xfb\0\0\0\x03".to_vec();
    bytes.resize(64 * 1024, 0);
    std::fs::write(&qcow2, &bytes).unwrap();
    let (ok, out) = daemon.json(&["capture", s(&qcow2)]);
    assert!(!ok);
    assert_eq!(out[0]["error"]["kind"], "image-format", "{out}");
    let message = out[0]["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("qcow2") && message.contains("qemu-img convert -O raw"),
        "{message}"
    );
    let (ok, out) = daemon.json(&["capture", "--force-raw", s(&qcow2)]);
    assert!(ok, "{out}");
}

#[test]
fn oversized_requests_get_an_answer() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(dir.path());
    let client = vmar::client::Client::new(&daemon.socket);
    // (A path: a name that long is not one, and the client would not send it.)
    let huge = format!("/{}", "x".repeat(3 << 20));
    let capture = vmar::protocol::request::Capture {
        path: huge.into(),
        name: None,
        recapture: false,
        force_raw: false,
    };
    let err = client.call(capture, &mut |_| {}).unwrap_err();
    assert!(err.to_string().contains("at most"), "{err}");
    // A long invalid name is not echoed whole.
    let long = "a/".repeat(5000);
    let (ok, out) = daemon.json(&["verify", &long]);
    assert!(!ok);
    assert!(
        out["error"]["message"].as_str().unwrap().len() < 400,
        "{out}"
    );
}

#[test]
fn a_full_state_disk_fails_requests_only_while_it_is_full() {
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("skipped: needs root to mount a small tmpfs");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=4m", "vmar-test", s(&state)])
        .status()
        .unwrap();
    assert!(mounted.success(), "mount tmpfs");
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(state.clone());
    let images = three_images(dir.path());
    let daemon = Daemon::start_env(
        dir.path(),
        &state,
        &dir.path().join("vmard.sock"),
        &["--sim", s(&dir.path().join("kernel"))],
        &[],
    );
    assert!(daemon.ctl(&["capture", s(&images[0])]).status.success());
    // Fill the disk: a capture and a create (one catalog commit) fail with the disk full...
    let filler = state.join("filler");
    let _ = std::fs::write(&filler, vec![1u8; 8 << 20]);
    let (ok, out) = daemon.json(&["capture", s(&images[1])]);
    assert!(!ok, "a capture on a full disk succeeded: {out}");
    let leftovers: Vec<_> = std::fs::read_dir(state.join("index"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "temporary runs left: {leftovers:?}");
    let (ok, out) = daemon.json(&["create", "base", "base"]);
    assert!(!ok, "a create on a full disk succeeded: {out}");
    // ...and once there is room again, the same vmard serves them, without a restart.
    std::fs::remove_file(&filler).unwrap();
    let (ok, out) = daemon.json(&["create", "base", "base"]);
    assert!(ok, "{out}");
    let (ok, out) = daemon.json(&["capture", s(&images[1])]);
    assert!(ok, "{out}");
    let (ok, report) = daemon.json(&["verify", "derived"]);
    assert!(ok, "{report}");
}

#[test]
fn the_state_is_private_to_vmard() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(dir.path());
    let state = daemon.stop();
    for (path, want) in [
        (state.clone(), 0o700),
        (state.join("index"), 0o700),
        (state.join("catalog.redb"), 0o600),
    ] {
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, want, "{} is {mode:o}", path.display());
    }
}

/// Runs `command`, killing it after `limit`: `None` if it still ran then.
fn output_within(
    command: &mut Command,
    limit: std::time::Duration,
) -> Option<std::process::Output> {
    use std::process::Stdio;
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + limit;
    while std::time::Instant::now() < deadline {
        if child.try_wait().unwrap().is_some() {
            return Some(child.wait_with_output().unwrap());
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}

/// Names in `dir`, sorted.
fn listing(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn recover_while_a_vmard_serves_the_state_dir_refuses_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let images = three_images(dir.path());
    let daemon = Daemon::start_sim(dir.path(), "");
    assert!(daemon.ctl(&["capture", s(&images[0])]).status.success());
    let state = dir.path().join("state");
    let before = listing(&state);
    let index_before = listing(&state.join("index"));
    let out = output_within(
        &mut common::vmard(
            dir.path(),
            &state,
            &dir.path().join("other.sock"),
            &["--sim", s(&dir.path().join("kernel")), "--recover"],
        ),
        std::time::Duration::from_secs(60),
    )
    .expect("a second vmard --recover is serving the same state dir");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("another vmard"), "{stderr}");
    assert!(stderr.contains("stop it first"), "{stderr}");
    assert_eq!(listing(&state), before, "the state dir changed");
    assert_eq!(listing(&state.join("index")), index_before);
    // The running vmard goes on, and what it does now is kept.
    assert!(daemon.ctl(&["capture", s(&images[1])]).status.success());
    assert!(daemon.ctl(&["create", "vm1", "derived"]).status.success());
    drop(daemon);
    let daemon = Daemon::start_sim(dir.path(), "");
    let (_, list) = daemon.json(&["images"]);
    assert_eq!(image_names(&list), ["base", "derived"]);
    let (_, devices) = daemon.json(&["list"]);
    assert_eq!(devices[0]["name"], "vm1", "{devices}");
    assert_eq!(devices[0]["state"], "active", "{devices}");
}

/// Client connections held by another user, for the tests below: run by
/// `slow_clients_of` as nobody (see `VMAR_SLOW_*`). Opens `VMAR_SLOW_COUNT` connections to
/// `VMAR_SLOW_SOCKET`, sends one byte on each, then one more every second (a request that
/// never ends), and reports on stdout: `busy N` (answered busy at once), `ready`, then when
/// every connection has ended or 40 s passed, `ended N` (closed by vmard with a reply) and
/// `open N`.
#[test]
#[ignore = "run by other tests as another user"]
fn slow_client_helper() {
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;
    let Some(socket) = std::env::var_os("VMAR_SLOW_SOCKET") else {
        return;
    };
    let count: usize = std::env::var("VMAR_SLOW_COUNT").unwrap().parse().unwrap();
    let mut streams: Vec<Option<UnixStream>> = (0..count)
        .map(|_| {
            let mut stream = UnixStream::connect(&socket).unwrap();
            // vmard may have answered busy and closed already.
            let _ = stream.write_all(b"{");
            stream.set_nonblocking(true).unwrap();
            Some(stream)
        })
        .collect();
    // What vmard answered on a connection, once it closed it.
    let answered = |stream: &mut UnixStream| -> Option<String> {
        let mut text = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match stream.read(&mut buf) {
                Ok(0) => return Some(String::from_utf8_lossy(&text).into_owned()),
                Ok(n) => text.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && text.is_empty() => {
                    return None;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                Err(_) => return Some(String::from_utf8_lossy(&text).into_owned()),
            }
        }
    };
    std::thread::sleep(std::time::Duration::from_millis(500));
    let mut busy = 0;
    for slot in streams.iter_mut() {
        if let Some(text) = answered(slot.as_mut().unwrap()) {
            assert!(text.contains("\"busy\""), "{text}");
            busy += 1;
            *slot = None;
        }
    }
    println!("HELPER busy {busy}");
    println!("HELPER ready");
    let mut ended = 0;
    let started = std::time::Instant::now();
    while started.elapsed() < std::time::Duration::from_secs(40)
        && streams.iter().any(Option::is_some)
    {
        std::thread::sleep(std::time::Duration::from_secs(1));
        for slot in streams.iter_mut() {
            let Some(stream) = slot.as_mut() else {
                continue;
            };
            if let Some(text) = answered(stream) {
                assert!(text.contains("not received within"), "{text}");
                ended += 1;
                *slot = None;
            } else {
                let _ = stream.write_all(b" ");
            }
        }
    }
    println!("HELPER ended {ended}");
    println!(
        "HELPER open {}",
        streams.iter().filter(|s| s.is_some()).count()
    );
}

/// Starts `slow_client_helper` as uid 65534 with `count` connections to `socket`.
fn slow_clients_of_nobody(socket: &Path, count: usize) -> std::process::Child {
    Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(std::env::current_exe().unwrap())
        .args(["--exact", "slow_client_helper", "--ignored", "--nocapture"])
        .env("VMAR_SLOW_SOCKET", socket)
        .env("VMAR_SLOW_COUNT", count.to_string())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("setpriv runs")
}

/// The next `HELPER` line of the helper's stdout, without the prefix.
fn helper_line(lines: &mut impl Iterator<Item = std::io::Result<String>>) -> String {
    lines
        .map(Result::unwrap)
        .find_map(|l| l.strip_prefix("HELPER ").map(str::to_string))
        .expect("the helper ended early")
}

/// A vmard whose socket nobody (group nogroup) may use.
fn daemon_for_nobody(dir: &Path) -> Daemon {
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let daemon = Daemon::start_args(
        dir,
        &dir.join("state"),
        &dir.join("run/vmard.sock"),
        &["--socket-group", "nogroup"],
    );
    std::fs::set_permissions(dir.join("run"), std::fs::Permissions::from_mode(0o755)).unwrap();
    daemon
}

#[test]
fn slow_clients_cannot_take_every_connection_and_are_cut_at_the_request_deadline() {
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("skipped: needs root to run clients as another user");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let daemon = daemon_for_nobody(dir.path());
    // 64 clients sending a byte a second: as many as vmard serves at once.
    let mut helper = slow_clients_of_nobody(&daemon.socket, vmar::server::MAX_CONNECTIONS);
    let mut lines = BufReader::new(helper.stdout.take().unwrap()).lines();
    let busy = helper_line(&mut lines);
    assert_eq!(helper_line(&mut lines), "ready");
    // Another client is served while they hold their connections.
    let out = daemon.ctl(&["ping"]);
    assert!(
        out.status.success(),
        "not served beside slow clients ({busy}): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // And the slow ones are cut once their request is overdue, not held forever: the
    // helper gives up after 40 s.
    let ended = helper_line(&mut lines);
    let open = helper_line(&mut lines);
    helper.wait().unwrap();
    assert_eq!(open, "open 0", "{busy}, {ended}");
    let busy: usize = busy.strip_prefix("busy ").unwrap().parse().unwrap();
    let ended: usize = ended.strip_prefix("ended ").unwrap().parse().unwrap();
    assert_eq!(busy + ended, vmar::server::MAX_CONNECTIONS);
}

#[test]
fn a_uid_over_its_share_is_answered_busy_while_another_uid_is_served() {
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("skipped: needs root to run clients as another user");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let daemon = daemon_for_nobody(dir.path());
    let share = vmar::clients::UID_SHARE;
    let mut helper = slow_clients_of_nobody(&daemon.socket, share + 1);
    let mut lines = BufReader::new(helper.stdout.take().unwrap()).lines();
    assert_eq!(helper_line(&mut lines), "busy 1");
    assert_eq!(helper_line(&mut lines), "ready");
    // Nobody's next request is refused, with why.
    let nobody = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(env!("CARGO_BIN_EXE_vmarctl"))
        .arg("--socket")
        .arg(&daemon.socket)
        .args(["--json", "ping"])
        .output()
        .unwrap();
    let value: Value = serde_json::from_slice(&nobody.stdout).unwrap();
    assert_eq!(value["error"]["kind"], "busy", "{value}");
    let message = value["error"]["message"].as_str().unwrap();
    assert!(message.contains("uid 65534"), "{message}");
    // Another uid (in the socket's group) and root are served meanwhile.
    let other = Command::new("setpriv")
        .args(["--reuid=65533", "--regid=65534", "--clear-groups"])
        .arg(env!("CARGO_BIN_EXE_vmarctl"))
        .arg("--socket")
        .arg(&daemon.socket)
        .arg("ping")
        .output()
        .unwrap();
    assert!(
        other.status.success(),
        "{}",
        String::from_utf8_lossy(&other.stderr)
    );
    assert!(daemon.ctl(&["ping"]).status.success());
    let _ = helper.kill();
    let _ = helper.wait();
}

#[test]
fn a_request_silent_for_longer_than_the_client_timeout_is_kept_alive_by_heartbeats() {
    let dir = tempfile::tempdir().unwrap();
    let images = three_images(dir.path());
    // The capture waits 8 s after hashing, sending nothing of its own meanwhile.
    let daemon = Daemon::start_env(
        dir.path(),
        &dir.path().join("state"),
        &dir.path().join("run/vmard.sock"),
        &[],
        &[("VMAR_FAULTS", "capture.hashed=sleep:8000")],
    );
    let out = daemon.ctl(&["--timeout", "3", "capture", s(&images[0])]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

// ---- monitoring and operations (issue 19) ----

/// The `vmarctl metrics` text of `daemon`.
fn metrics_text(daemon: &Daemon) -> String {
    let out = daemon.ctl(&["metrics"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Runs `promtool check metrics` on `text`; false when promtool is not installed (and
/// VMAR_REQUIRE_PROMTOOL is not set, as tools/test sets it).
fn promtool_accepts(text: &str) -> bool {
    use std::io::Write;
    let child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(child) => child,
        Err(e) if std::env::var_os("VMAR_REQUIRE_PROMTOOL").is_none() => {
            eprintln!("skipped promtool: {e} (apt-get install prometheus)");
            return false;
        }
        Err(e) => panic!("promtool: {e}"),
    };
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics:\n{}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    true
}

#[test]
fn metrics_describe_devices_images_and_restore_and_pass_promtool() {
    let dir = tempfile::tempdir().unwrap();
    let paths = three_images(dir.path());
    let daemon = Daemon::start_sim(dir.path(), "");
    for path in &paths {
        assert!(daemon.ctl(&["capture", s(path)]).status.success());
    }
    assert!(daemon.ctl(&["create", "d1", "derived"]).status.success());
    let text = metrics_text(&daemon);
    promtool_accepts(&text);
    for line in [
        "vmar_up 1",
        "vmar_device_state{device=\"d1\",node=\"/dev/vmar/d1\",image=\"derived\",state=\"active\"} 1",
        "vmar_device_active{device=\"d1\"} 1",
        "vmar_catalog_images 3",
        "vmar_image_missing{image=\"other\"} 0",
        "vmar_image_changed{image=\"base\"} 0",
        "vmar_restore_success 1",
    ] {
        assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
    }
    // derived reads most of its blocks from base: shared bytes and redirected mapping.
    let value = |prefix: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(prefix))
            .unwrap_or_else(|| panic!("no {prefix} in\n{text}"))
            .trim()
            .parse()
            .unwrap()
    };
    assert!(value("vmar_image_shared_bytes{image=\"derived\"}") > 0.0);
    assert!(value("vmar_device_mapped_bytes{device=\"d1\",class=\"redirected\"}") > 0.0);
    assert!(value("vmar_catalog_bytes") > 0.0);
    // A missing image file and a changed one are told apart.
    std::fs::remove_file(&paths[2]).unwrap();
    // By path: the guard refuses opens for writing of an image a live device reads.
    let grown = std::fs::metadata(&paths[0]).unwrap().len() + 4096;
    nix::unistd::truncate(&paths[0], i64::try_from(grown).unwrap()).unwrap();
    let text = metrics_text(&daemon);
    assert!(
        text.contains("\nvmar_image_missing{image=\"other\"} 1\n"),
        "{text}"
    );
    assert!(
        text.contains("\nvmar_image_changed{image=\"base\"} 1\n"),
        "{text}"
    );
    assert!(
        text.contains("\nvmar_image_missing{image=\"base\"} 0\n"),
        "{text}"
    );

    // --output: written atomically, nothing else left in the directory.
    let textfile = dir.path().join("textfile");
    std::fs::create_dir(&textfile).unwrap();
    let prom = textfile.join("vmar.prom");
    assert!(
        daemon
            .ctl(&["metrics", "--output", s(&prom)])
            .status
            .success()
    );
    let written = std::fs::read_to_string(&prom).unwrap();
    assert!(written.contains("\nvmar_catalog_images 3\n"), "{written}");
    assert_eq!(std::fs::read_dir(&textfile).unwrap().count(), 1);
    let mode = std::fs::metadata(&prom).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o644, "node_exporter must be able to read it");
    // vmard gone: the file says so, vmarctl exits 6.
    let socket = daemon.socket.clone();
    drop(daemon);
    let out = vmarctl(&socket, &["metrics", "--output", s(&prom)]);
    assert_eq!(out.status.code(), Some(6));
    let down = std::fs::read_to_string(&prom).unwrap();
    assert!(down.lines().any(|l| l == "vmar_up 0"), "{down}");
    promtool_accepts(&down);
}

#[test]
fn the_read_only_socket_serves_reads_to_anyone_and_nothing_else() {
    let dir = tempfile::tempdir().unwrap();
    let paths = three_images(dir.path());
    let daemon = Daemon::start_sim(dir.path(), "");
    assert!(daemon.ctl(&["capture", s(&paths[0])]).status.success());
    assert!(daemon.ctl(&["create", "b", "base"]).status.success());
    let ro = dir.path().join("run/vmard.ro.sock");
    let mode = std::fs::metadata(&ro).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o666);
    for args in [
        &["ping"][..],
        &["images"],
        &["map", "base"],
        &["table", "base"],
        &["list"],
        &["status", "b"],
        &["stats"],
        &["metrics"],
        &["dependents", "base"],
        &["restore-status"],
        &["working-set", "b", "--extents"],
    ] {
        let out = vmarctl(&ro, args);
        assert!(
            out.status.success(),
            "{args:?} on the read-only socket: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    for args in [
        &["remove", "b"][..],
        &["create", "c", "base"],
        &["refresh", "b"],
        &["forget", "base"],
        &["capture", s(&paths[1])],
        &["verify", "base"],
        &["record", "b"],
        &["working-set", "b", "--forget"],
        &["warm", "b"],
        &["warm", "--cancel"],
    ] {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        let out = vmarctl(&ro, &all);
        let value: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(out.status.code(), Some(6), "{args:?}: {value}");
        // capture answers one entry per image.
        let error = match value.get("images") {
            Some(images) => &images[0]["error"],
            None => &value["error"],
        };
        assert_eq!(error["kind"], "permission-denied", "{args:?}: {value}");
    }
    assert!(
        daemon.ctl(&["status", "b"]).status.success(),
        "b is still there"
    );

    // Any user: nobody reads through it, but not through the main socket.
    if nix::unistd::Uid::effective().is_root() {
        for d in [dir.path(), &dir.path().join("run")] {
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        let as_nobody = |socket: &Path| {
            Command::new("setpriv")
                .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
                .arg(env!("CARGO_BIN_EXE_vmarctl"))
                .arg("--socket")
                .arg(socket)
                .arg("list")
                .output()
                .expect("setpriv runs")
        };
        assert!(as_nobody(&ro).status.success());
        assert!(!as_nobody(&daemon.socket).status.success());
    }
    assert!(daemon.terminate().success());
    assert!(!ro.exists(), "the read-only socket is removed at stop");
    // --no-ro-socket: none.
    let other = tempfile::tempdir().unwrap();
    let _daemon = Daemon::start_args(
        other.path(),
        &other.path().join("state"),
        &other.path().join("run/vmard.sock"),
        &["--no-ro-socket"],
    );
    assert!(!other.path().join("run/vmard.ro.sock").exists());
}

#[test]
fn requests_are_logged_with_the_callers_uid_and_pid() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("vmard.log");
    let socket = dir.path().join("run/vmard.sock");
    let mut child = common::vmard(dir.path(), &dir.path().join("state"), &socket, &[])
        .env("VMAR_LOG", "info")
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !vmarctl(&socket, &["ping"]).status.success() {
        assert!(std::time::Instant::now() < deadline, "vmard did not start");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let out = vmarctl(&socket, &["map", "nosuch"]);
    assert!(!out.status.success());
    let _ = child.kill();
    let _ = child.wait();
    let text = std::fs::read_to_string(&log).unwrap();
    let uid = nix::unistd::Uid::effective();
    let request = text
        .lines()
        .find(|l| l.contains("Map {"))
        .unwrap_or_else(|| panic!("no request line:\n{text}"));
    assert!(
        request.contains(&format!("uid={uid} pid=")),
        "no caller in {request:?}"
    );
    let failed = text
        .lines()
        .find(|l| l.contains("request failed"))
        .unwrap_or_else(|| panic!("no failure line:\n{text}"));
    assert!(failed.contains(&format!("uid={uid}")), "{failed}");
}

#[test]
fn check_config_says_whether_vmard_would_load_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("vmar.toml");
    let check = || {
        Command::new(env!("CARGO_BIN_EXE_vmard"))
            .arg("--config")
            .arg(&config)
            .arg("--check-config")
            .output()
            .unwrap()
    };
    std::fs::write(
        &config,
        format!("image_roots = [\"{}\"]\nmax_targets = 500\n", s(dir.path())),
    )
    .unwrap();
    let out = check();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("max_targets 500"));
    // A root that is missing now is no error (vmard starts and its devices wait for it),
    // but it is said.
    std::fs::write(&config, "image_roots = [\"/nonexistent/vmar-root\"]\n").unwrap();
    let out = check();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains("/nonexistent/vmar-root") && said.contains("cannot be used now"),
        "{said}"
    );
    for bad in [
        "image_roots = [".to_string(),
        "image_root = []\n".to_string(),
        "max_targets = \"many\"\n".to_string(),
        "auto_capture_settle = -3\n".to_string(),
        "socket_group = \"no-such-group-vmar\"\n".to_string(),
    ] {
        std::fs::write(&config, &bad).unwrap();
        let out = check();
        assert_eq!(out.status.code(), Some(1), "{bad:?} was accepted");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("bad configuration"),
            "{bad:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn ctrl_c_of_a_capture_cancels_it_in_vmard() {
    let dir = tempfile::tempdir().unwrap();
    let paths = three_images(dir.path());
    // Holds the capture in its first batch long enough to interrupt the client.
    let daemon = Daemon::start_sim(dir.path(), "capture.batch=sleep:1500");
    let child = Command::new(env!("CARGO_BIN_EXE_vmarctl"))
        .arg("--socket")
        .arg(&daemon.socket)
        .args(["capture", s(&paths[0])])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(500));
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap());
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(130));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("vmard cancels the capture"), "{stderr}");
    // Once the held batch is done vmard finds the client gone and keeps nothing.
    std::thread::sleep(std::time::Duration::from_millis(2500));
    let (ok, images) = daemon.document(&["images"]);
    assert!(ok);
    assert_eq!(images["images"], serde_json::json!([]), "{images}");
    let (ok, captured) = daemon.json(&["capture", s(&paths[0])]);
    assert!(ok, "{captured}");
    assert_eq!(captured[0]["result"]["status"], "captured");
}

#[test]
fn a_read_only_state_dir_is_named_as_such() {
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("skipped: needs root to bind-mount the state dir read-only");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(dir.path());
    let state = daemon.stop();
    let mount = |args: &[&str]| {
        let status = Command::new("mount").args(args).status().unwrap();
        assert!(status.success(), "mount {args:?}");
    };
    mount(&["--bind", s(&state), s(&state)]);
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(state.clone());
    mount(&["-o", "remount,bind,ro", s(&state)]);
    let out = Command::new(env!("CARGO_BIN_EXE_vmard"))
        .arg("--state-dir")
        .arg(&state)
        .arg("--socket")
        .arg(dir.path().join("ro.sock"))
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    // On main: "catalog.redb cannot be read (I/O error: Read-only file system) ... rebuild it
    // with `vmard --recover`".
    assert!(stderr.contains("the state dir is read-only"), "{stderr}");
    assert!(stderr.contains("read-only file system"), "{stderr}");
    assert!(stderr.contains("do not run --recover"), "{stderr}");
}
