//! vmarctl as scripts use it: exit status by class, closed pipes, JSON documents checked
//! against docs/vmarctl-json.schema.json, table options, man pages, live completions,
//! progress lines, fingerprints and auto-capture. Device commands run on vmard --sim.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use common::{BLOCK, Block, Daemon, s, write_image};

fn vmarctl_bin() -> PathBuf {
    common::binary("vmarctl", env!("CARGO_BIN_EXE_vmarctl"))
}

/// Exit code of `vmarctl ARGS` (with the daemon's socket).
fn code(daemon: &Daemon, args: &[&str]) -> i32 {
    daemon.ctl(args).status.code().expect("vmarctl exits")
}

/// Three related images in `dir`: base, web (base + its own blocks), and a copy of base.
fn images(dir: &Path) -> Vec<PathBuf> {
    let base: Vec<Block> = (0..32)
        .map(|i| match i % 8 {
            0 => Block::Hole,
            _ => Block::Shared(u8::try_from(i).unwrap()),
        })
        .collect();
    let mut web = base.clone();
    for (i, b) in web.iter_mut().enumerate().skip(20) {
        *b = Block::Unique(i as u64);
    }
    let paths = vec![
        dir.join("base.raw"),
        dir.join("web.raw"),
        dir.join("copy.raw"),
    ];
    write_image(&paths[0], &base, 0);
    write_image(&paths[1], &web, 0);
    write_image(&paths[2], &base, 0);
    paths
}

fn capture(daemon: &Daemon, paths: &[PathBuf]) {
    let mut args = vec!["capture"];
    args.extend(paths.iter().map(|p| s(p)));
    let out = daemon.ctl(&args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

// ---- a small JSON Schema checker: the subset docs/vmarctl-json.schema.json uses ----

fn schema() -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/vmarctl-json.schema.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn type_matches(value: &Value, ty: &str) -> bool {
    match ty {
        "object" => value.is_object(),
        "array" => value.is_array(),
        "string" => value.is_string(),
        "integer" => value.is_i64() || value.is_u64(),
        "number" => value.is_number(),
        "boolean" => value.is_boolean(),
        "null" => value.is_null(),
        other => panic!("schema uses unknown type {other}"),
    }
}

/// Errors of `value` against `schema` (empty: valid), each with its JSON path.
fn check(root: &Value, schema: &Value, value: &Value, at: &str, errors: &mut Vec<String>) {
    if let Some(reference) = schema.get("$ref").and_then(Value::as_str) {
        let name = reference.strip_prefix("#/$defs/").expect("local $ref");
        check(root, &root["$defs"][name], value, at, errors);
    }
    if let Some(all) = schema.get("allOf").and_then(Value::as_array) {
        for s in all {
            check(root, s, value, at, errors);
        }
    }
    if let Some(expected) = schema.get("const")
        && value != expected
    {
        errors.push(format!("{at}: {value} is not {expected}"));
    }
    if let Some(options) = schema.get("enum").and_then(Value::as_array)
        && !options.contains(value)
    {
        errors.push(format!("{at}: {value} is not one of {options:?}"));
    }
    if let Some(ty) = schema.get("type") {
        let types: Vec<&str> = match ty {
            Value::String(t) => vec![t.as_str()],
            Value::Array(ts) => ts.iter().filter_map(Value::as_str).collect(),
            _ => panic!("bad type in schema"),
        };
        if !types.iter().any(|t| type_matches(value, t)) {
            errors.push(format!("{at}: {value} is not of type {types:?}"));
            return;
        }
    }
    if let Some(object) = value.as_object() {
        for key in schema
            .get("required")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let key = key.as_str().unwrap();
            if !object.contains_key(key) {
                errors.push(format!("{at}: no {key:?}"));
            }
        }
        let properties = schema.get("properties").and_then(Value::as_object);
        for (key, field) in object {
            match properties.and_then(|p| p.get(key)) {
                Some(s) => check(root, s, field, &format!("{at}.{key}"), errors),
                None if schema.get("additionalProperties") == Some(&Value::Bool(false)) => {
                    errors.push(format!("{at}: unexpected {key:?}"))
                }
                None => {}
            }
        }
    }
    if let (Some(items), Some(array)) = (schema.get("items"), value.as_array()) {
        for (i, item) in array.iter().enumerate() {
            check(root, items, item, &format!("{at}[{i}]"), errors);
        }
    }
}

/// Asserts that `value` is a valid document of `command`.
fn assert_shape(command: &str, value: &Value) {
    let root = schema();
    let def = &root["$defs"][command];
    assert!(!def.is_null(), "the schema has no document for {command}");
    let mut errors = Vec::new();
    check(&root, def, value, "$", &mut errors);
    assert!(errors.is_empty(), "{command}: {errors:#?}\n{value:#}");
}

#[test]
fn the_schema_checker_rejects_what_it_should() {
    let bad = serde_json::json!({"version": 2, "error": {"kind": 1}});
    let root = schema();
    let mut errors = Vec::new();
    check(&root, &root["$defs"]["error"], &bad, "$", &mut errors);
    assert_eq!(errors.len(), 3, "{errors:?}");
    let mut errors = Vec::new();
    let list = serde_json::json!({"version": 1, "devices": [{"name": "x", "state": "gone"}]});
    check(&root, &root["$defs"]["list"], &list, "$", &mut errors);
    assert!(errors.iter().any(|e| e.contains("gone")), "{errors:?}");
}

#[test]
fn every_command_prints_its_documented_json() {
    let dir = tempfile::tempdir().unwrap();
    let paths = images(dir.path());
    let daemon = Daemon::start_sim(dir.path(), "");
    let doc = |args: &[&str]| {
        let (ok, value) = daemon.document(args);
        assert!(ok, "{args:?}: {value}");
        value
    };
    assert_shape("ping", &doc(&["ping"]));
    assert_shape("capture", &doc(&["capture", s(&paths[0]), s(&paths[1])]));
    assert_shape("images", &doc(&["images"]));
    assert_shape("map", &doc(&["map", "web", "--extents"]));
    assert_shape("table", &doc(&["table", "web"]));
    assert_shape("verify", &doc(&["verify", "web"]));
    assert_shape("create", &doc(&["create", "w1", "web"]));
    assert_shape("refresh", &doc(&["refresh", "w1"]));
    assert_shape("list", &doc(&["list"]));
    let status = doc(&["status", "w1", "--table"]);
    assert_shape("status", &status);
    assert!(
        status["fingerprint"]
            .as_str()
            .unwrap()
            .starts_with("blake3:")
    );
    assert_shape("stats", &doc(&["stats"]));
    assert_shape("libvirt-xml", &doc(&["libvirt-xml", "w1"]));
    assert_shape("check", &doc(&["check"]));
    assert_shape("remove", &doc(&["remove", "w1"]));
    let forgotten = doc(&["forget", "base"]);
    assert_shape("forget", &forgotten);
    assert_eq!(forgotten["rebuilt"], serde_json::json!(["web"]));
    // Failures, including usage errors and a daemon that is not there.
    for args in [
        vec!["map", "nosuch"],
        vec!["map"],
        vec!["table", "web", "--device", "nosuch=/dev/sda"],
        vec!["create", "w2", "nosuch"],
    ] {
        let (ok, value) = daemon.document(&args);
        assert!(!ok, "{args:?}");
        assert_shape("error", &value);
    }
    let out = common::vmarctl(&dir.path().join("none.sock"), &["--json", "images"]);
    assert_shape("error", &serde_json::from_slice(&out.stdout).unwrap());
    // A capture that fails for one image still documents both.
    let (ok, value) = daemon.document(&["capture", s(&paths[2]), "/nonexistent/x.raw"]);
    assert!(!ok);
    assert_shape("capture", &value);
    assert!(value["images"][1]["error"]["kind"].is_string(), "{value}");
}

#[test]
fn exit_status_tells_the_class_of_failure() {
    let dir = tempfile::tempdir().unwrap();
    let paths = images(dir.path());
    let daemon = Daemon::start_sim(dir.path(), "");
    capture(&daemon, &paths[..2]);
    assert_eq!(code(&daemon, &["ping"]), 0);
    // Usage.
    assert_eq!(code(&daemon, &["map"]), 2);
    assert_eq!(code(&daemon, &["frobnicate"]), 2);
    assert_eq!(code(&daemon, &["images", "-o", "nosuch"]), 2);
    assert_eq!(
        code(
            &daemon,
            &["capture", "--name", "x", s(&paths[0]), s(&paths[1])]
        ),
        2
    );
    // Not found.
    assert_eq!(code(&daemon, &["map", "nosuch"]), 4);
    assert_eq!(code(&daemon, &["status", "nosuch"]), 4);
    // Refused: outside the image roots, device open.
    let outside = tempfile::tempdir().unwrap();
    let stray = outside.path().join("stray.raw");
    write_image(&stray, &[Block::Unique(1)], 0);
    assert_eq!(code(&daemon, &["capture", s(&stray)]), 5);
    assert_eq!(code(&daemon, &["create", "w1", "web"]), 0);
    let kernel = vmar::kernel::sim::SimKernel::open(&dir.path().join("kernel")).unwrap();
    kernel.open_device("w1").unwrap();
    assert_eq!(code(&daemon, &["remove", "w1"]), 5);
    // Deferred removal: shown as waiting for it, in list and status.
    assert_eq!(code(&daemon, &["remove", "w1", "--deferred"]), 0);
    let list = String::from_utf8(
        daemon
            .ctl(&["list", "--noheadings", "-o", "name,state"])
            .stdout,
    )
    .unwrap();
    assert_eq!(
        list.split_whitespace().collect::<Vec<_>>(),
        ["w1", "removing"]
    );
    let status = String::from_utf8(daemon.ctl(&["status", "w1"]).stdout).unwrap();
    assert!(
        status.contains("removing (waits for its last user"),
        "{status}"
    );
    // Unreachable.
    let none = dir.path().join("none.sock");
    assert_eq!(common::vmarctl(&none, &["ping"]).status.code(), Some(6));
}

#[test]
fn permission_denied_on_the_socket_says_how_to_get_access() {
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("skipped: needs root to run a client as another user");
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let daemon = Daemon::start(dir.path());
    std::fs::set_permissions(
        dir.path().join("run"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    // The socket stays 0600: connecting as nobody fails with EACCES.
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(vmarctl_bin())
        .arg("--socket")
        .arg(&daemon.socket)
        .arg("ping")
        .output()
        .expect("setpriv runs");
    assert_eq!(out.status.code(), Some(6));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("permission denied"), "{stderr}");
    assert!(stderr.contains("socket_group"), "{stderr}");
    assert!(!stderr.contains("systemctl start"), "{stderr}");
}

/// A stand-in vmard on `socket` that answers one request with `reply_lines`, pausing
/// `pause` before each.
fn fake_vmard(
    socket: &Path,
    reply_lines: Vec<String>,
    pause: Duration,
) -> std::thread::JoinHandle<String> {
    let listener = UnixListener::bind(socket).unwrap();
    std::thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        let mut request = String::new();
        reader.read_line(&mut request).unwrap();
        let mut stream = stream;
        for line in reply_lines {
            std::thread::sleep(pause);
            if writeln!(stream, "{line}").is_err() {
                break;
            }
        }
        request
    })
}

#[test]
fn a_verify_mismatch_exits_3_and_long_operations_show_progress_without_a_terminal() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("fake.sock");
    let total = 1u64 << 30;
    let mut lines: Vec<String> = (0..=5)
        .map(|i| {
            format!(
                r#"{{"type":"progress","done":{},"total":{total}}}"#,
                total / 5 * i
            )
        })
        .collect();
    lines.push(
        serde_json::json!({"type": "ok", "result": {
            "name": "web", "blocks": 262144, "bytes_compared": 4096, "ok": false,
            "mismatch": {"block": 7, "offset": 28672, "source": {"kind": "own"}, "source_image": null}
        }})
        .to_string(),
    );
    let server = fake_vmard(&socket, lines, Duration::from_millis(600));
    let out = common::vmarctl(&socket, &["verify", "web"]);
    let request: Value = serde_json::from_str(&server.join().unwrap()).unwrap();
    assert_eq!(request["op"], "verify");
    assert_eq!(out.status.code(), Some(3));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("MISMATCH at block 7"), "{stdout}");
    // stderr is a pipe here: about 3.6 s of work gives progress lines, then a final one.
    let stderr = String::from_utf8_lossy(&out.stderr);
    let progress: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("verify web:"))
        .collect();
    assert!(progress.len() >= 2, "{stderr}");
    assert!(progress.iter().any(|l| l.contains('%')), "{stderr}");
    assert!(progress.last().unwrap().contains("done in"), "{stderr}");
}

#[test]
fn a_closed_stdout_ends_the_command_quietly() {
    let dir = tempfile::tempdir().unwrap();
    // Alternating blocks: thousands of extents, far more output than a pipe holds.
    let blocks: Vec<Block> = (0..6000u64)
        .map(|i| {
            if i % 2 == 0 {
                Block::Unique(i)
            } else {
                Block::Hole
            }
        })
        .collect();
    let path = dir.path().join("big.raw");
    write_image(&path, &blocks, 0);
    let daemon = Daemon::start_sim(dir.path(), "");
    capture(&daemon, &[path]);
    for args in [
        vec!["map", "big", "--extents"],
        vec!["--json", "map", "big", "--extents"],
    ] {
        let mut child = Command::new(vmarctl_bin())
            .arg("--socket")
            .arg(&daemon.socket)
            .args(&args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdout = child.stdout.take().unwrap();
        let mut head = [0u8; 200];
        stdout.read_exact(&mut head).unwrap();
        drop(stdout);
        let out = child.wait_with_output().unwrap();
        assert_eq!(out.status.code(), Some(0), "{args:?}");
        assert_eq!(String::from_utf8_lossy(&out.stderr), "", "{args:?}");
    }
}

#[test]
fn tables_fit_long_names_and_take_lvs_options() {
    let dir = tempfile::tempdir().unwrap();
    let nova = "0123456789abcdef0123456789abcdef01234567";
    let paths = images(dir.path());
    let long = dir.path().join(nova);
    std::fs::copy(&paths[1], &long).unwrap();
    let daemon = Daemon::start_sim(dir.path(), "");
    capture(&daemon, &[paths[0].clone(), long]);
    let text = |args: &[&str]| {
        let out = daemon.ctl(args);
        assert!(out.status.success(), "{args:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    // Aligned: every line has its SIZE ending at the same column.
    let table = text(&["images", "-o", "name,size,path"]);
    let ends: Vec<usize> = table
        .lines()
        .map(|l| l.find("  /").or_else(|| l.find("  PATH")).unwrap())
        .collect();
    assert_eq!(ends.len(), 3, "{table}");
    assert!(ends.iter().all(|&e| e == ends[0]), "{table}");
    assert!(table.contains(nova), "{table}");
    // Script-friendly: no headings, chosen fields, exact sizes, a separator.
    let size = std::fs::metadata(&paths[0]).unwrap().len();
    let rows = text(&[
        "images",
        "--noheadings",
        "-o",
        "name,size",
        "--units",
        "b",
        "--separator",
        ":",
    ]);
    assert_eq!(rows, format!("base:{size}B\n{nova}:{size}B\n"));
    let sectors = text(&["images", "--noheadings", "-o", "size", "--units", "s"]);
    assert_eq!(
        sectors.lines().next(),
        Some(format!("{}S", size / 512).as_str())
    );
    // +FIELD adds to the default columns.
    let plus = text(&["images", "-o", "+fingerprint"]);
    let heading = plus.lines().next().unwrap();
    assert!(
        heading.starts_with("ID") && heading.ends_with("FINGERPRINT"),
        "{heading}"
    );
    // list takes them too.
    text(&["create", nova, nova]);
    let list = text(&[
        "list",
        "--noheadings",
        "-o",
        "name,image",
        "--separator",
        ",",
    ]);
    assert_eq!(list, format!("{nova},{nova}\n"));
}

#[test]
fn table_refuses_a_device_for_an_image_it_does_not_read() {
    let dir = tempfile::tempdir().unwrap();
    let paths = images(dir.path());
    let daemon = Daemon::start_sim(dir.path(), "");
    capture(&daemon, &paths[..2]);
    let out = daemon.ctl(&["table", "web", "--device", "nosuch=/dev/sda"]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("does not read image \"nosuch\""),
        "{stderr}"
    );
    assert!(stderr.contains("base"), "{stderr}");
    let out = daemon.ctl(&["table", "web", "--device", "base=/dev/sda"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("/dev/sda"));
}

#[test]
fn forget_and_recapture_list_the_maps_they_rebuilt() {
    let dir = tempfile::tempdir().unwrap();
    let paths = images(dir.path());
    let daemon = Daemon::start_sim(dir.path(), "");
    capture(&daemon, &paths);
    let out = daemon.ctl(&["forget", "web"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    // Nothing read web's own blocks: no other map changes.
    assert!(stdout.contains("no map changed"), "{stdout}");
    // Touching base makes it changed; re-capturing rebuilds it and the maps that read from it.
    let file = std::fs::OpenOptions::new()
        .append(true)
        .open(&paths[0])
        .unwrap();
    file.set_len(std::fs::metadata(&paths[0]).unwrap().len() + BLOCK as u64)
        .unwrap();
    let (ok, value) = daemon.document(&["capture", "--recapture", s(&paths[0])]);
    assert!(ok, "{value}");
    assert_eq!(
        value["images"][0]["result"]["rebuilt"],
        serde_json::json!(["base", "copy"])
    );
    // The new version of base reads copy's blocks now.
    let (ok, value) = daemon.document(&["forget", "copy"]);
    assert!(ok, "{value}");
    assert_eq!(value["rebuilt"], serde_json::json!(["base"]));
}

#[test]
fn fingerprints_are_equal_exactly_for_equal_content() {
    let dir = tempfile::tempdir().unwrap();
    let paths = images(dir.path());
    let daemon = Daemon::start_sim(dir.path(), "");
    capture(&daemon, &paths);
    let (_, list) = daemon.document(&["images"]);
    let fingerprint = |name: &str| {
        list["images"]
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["name"] == name)
            .unwrap()["fingerprint"]
            .as_str()
            .unwrap()
            .to_string()
    };
    // copy has base's bytes at another path and captured later (its map redirects).
    assert_eq!(fingerprint("base"), fingerprint("copy"));
    assert_ne!(fingerprint("base"), fingerprint("web"));
    // Independently: the documented construction over the file's non-zero blocks.
    let bytes = std::fs::read(&paths[1]).unwrap();
    let mut hasher = blake3::Hasher::new_derive_key("vmar 2026 image fingerprint v1");
    hasher.update(&(bytes.len() as u64).to_le_bytes());
    for (i, block) in bytes.chunks(BLOCK).enumerate() {
        if block.iter().any(|&b| b != 0) {
            hasher.update(&(i as u64).to_le_bytes());
            hasher.update(blake3::hash(block).as_bytes());
        }
    }
    assert_eq!(
        fingerprint("web"),
        format!("blake3:{}", hasher.finalize().to_hex())
    );
}

#[test]
fn man_pages_for_every_subcommand_have_every_section() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(vmarctl_bin())
        .args(["man", "--dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(out.status.success());
    let help = Command::new(vmarctl_bin()).arg("--help").output().unwrap();
    let help = String::from_utf8(help.stdout).unwrap();
    let commands: Vec<&str> = help
        .lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert!(commands.len() >= 15, "{help}");
    let mut pages = vec!["vmarctl".to_string()];
    pages.extend(commands.iter().map(|c| format!("vmarctl-{c}")));
    for page in &pages {
        let path = dir.path().join(format!("{page}.1"));
        let roff = std::fs::read_to_string(&path).unwrap_or_else(|_| panic!("no {page}.1"));
        for section in [
            "NAME",
            "SYNOPSIS",
            "DESCRIPTION",
            "OPTIONS",
            "\"EXIT STATUS\"",
            "\"FILES\"",
            "\"ENVIRONMENT\"",
            "\"EXAMPLES\"",
        ] {
            assert!(
                roff.contains(&format!(".SH {section}")),
                "{page}: no {section}"
            );
        }
        // Every page has at least one example, and the exit codes are all there.
        let examples = roff.split(".SH \"EXAMPLES\"").nth(1).unwrap();
        assert!(examples.contains(".nf"), "{page}: no example");
        for (class, _) in vmar::error::ExitClass::ALL {
            assert!(roff.contains(&format!(".B {}\n", class.code())), "{page}");
        }
        // groff parses it without warnings, when it is installed.
        if let Ok(out) = Command::new("groff")
            .args(["-man", "-Tutf8", "-ww", "-z"])
            .arg(&path)
            .output()
        {
            assert!(
                out.stderr.is_empty(),
                "{page}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

#[test]
fn bash_completion_offers_live_image_and_device_names() {
    if Command::new("bash").arg("--version").output().is_err() {
        eprintln!("skipped: no bash");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let paths = images(dir.path());
    let daemon = Daemon::start_sim(dir.path(), "");
    capture(&daemon, &paths[..2]);
    assert!(daemon.ctl(&["create", "dev1", "web"]).status.success());
    let script = dir.path().join("vmarctl.bash");
    let out = Command::new(vmarctl_bin())
        .args(["completions", "bash"])
        .output()
        .unwrap();
    std::fs::write(&script, &out.stdout).unwrap();
    let bin_dir = vmarctl_bin().parent().unwrap().to_path_buf();
    let complete = |words: &str| {
        let program = format!(
            "source {}; COMP_WORDS=(vmarctl --socket {} {words}); COMP_CWORD=$((${{#COMP_WORDS[@]}} - 1)); _vmarctl_live vmarctl \"${{COMP_WORDS[COMP_CWORD]}}\" \"${{COMP_WORDS[COMP_CWORD-1]}}\"; printf '%s\\n' \"${{COMPREPLY[@]}}\"",
            s(&script),
            s(&daemon.socket)
        );
        let path = format!(
            "{}:{}",
            bin_dir.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let out = Command::new("bash")
            .arg("-c")
            .arg(program)
            .env("PATH", path)
            .output()
            .unwrap();
        let mut words: Vec<String> = String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .filter(|l| !l.is_empty())
            .map(str::to_string)
            .collect();
        words.sort();
        words
    };
    assert_eq!(complete("verify ''"), ["base", "web"]);
    assert_eq!(complete("map w"), ["web"]);
    assert_eq!(complete("create newdev ''"), ["base", "web"]);
    assert_eq!(complete("status ''"), ["dev1"]);
    // Other words are clap's: subcommands, not the hidden one.
    assert!(complete("ver").contains(&"verify".to_string()));
    assert_eq!(complete("__"), Vec::<String>::new());
}

/// vmard on the simulated kernel with auto-capture of `root` (settle 0.5 s).
fn auto_daemon(dir: &Path) -> (Daemon, PathBuf) {
    let root = dir.join("images");
    std::fs::create_dir_all(&root).unwrap();
    let config = dir.join("vmar.toml");
    std::fs::write(&config, "auto_capture = true\nauto_capture_settle = 0.5\n").unwrap();
    let kernel = dir.join("kernel");
    let daemon = Daemon::start_env(
        &root,
        &dir.join("state"),
        &dir.join("run/vmard.sock"),
        &["--sim", s(&kernel), "--config", s(&config)],
        &[],
    );
    (daemon, root)
}

fn auto_report(daemon: &Daemon) -> Value {
    let (ok, value) = daemon.document(&["images"]);
    assert!(ok, "{value}");
    assert_shape("images", &value);
    value
}

fn captured_names(report: &Value) -> Vec<String> {
    report["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["name"].as_str().unwrap().to_string())
        .collect()
}

/// Waits up to 15 s for `what` of the images document.
fn wait_for(daemon: &Daemon, what: &str, test: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let report = auto_report(daemon);
        if test(&report) {
            return report;
        }
        assert!(Instant::now() < deadline, "no {what}: {report:#}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn auto_capture_waits_for_a_slow_writer_to_finish() {
    let dir = tempfile::tempdir().unwrap();
    let (daemon, root) = auto_daemon(dir.path());
    let path = root.join("slow.raw");
    let mut file = std::fs::File::create(&path).unwrap();
    let blocks: Vec<Vec<u8>> = (0..6)
        .map(|i| common::block_bytes(&Block::Unique(i)))
        .collect();
    for block in &blocks[..3] {
        file.write_all(block).unwrap();
        std::thread::sleep(Duration::from_millis(150));
    }
    // The writer pauses for three settle times with the file still open: not complete.
    std::thread::sleep(Duration::from_millis(1500));
    // (How soon the watcher lists it depends on the machine's load: wait for that, never
    // for a capture.)
    let report = wait_for(&daemon, "slow.raw waiting", |r| {
        r["auto_capture"]["waiting"] == serde_json::json!([s(&path)])
    });
    assert!(captured_names(&report).is_empty(), "{report:#}");
    for block in &blocks[3..] {
        file.write_all(block).unwrap();
    }
    drop(file);
    // The watcher records the capture once vmard has answered it, a moment after the
    // catalog shows it: wait for both.
    let report = wait_for(&daemon, "capture of slow", |r| {
        captured_names(r) == ["slow"] && r["auto_capture"]["captured"][0]["path"] == s_(&path)
    });
    assert_eq!(report["images"][0]["size"], 6 * BLOCK);
    assert_eq!(report["auto_capture"]["captured"][0]["path"], s(&path));
    let (ok, verify) = daemon.document(&["verify", "slow"]);
    assert!(ok && verify["ok"] == true, "{verify}");
}

#[test]
fn auto_capture_takes_a_file_renamed_into_place_and_never_its_partial_name() {
    let dir = tempfile::tempdir().unwrap();
    let (daemon, root) = auto_daemon(dir.path());
    // As Nova fills its _base cache: download to NAME.part, rename to NAME (40 hex digits).
    let nova = "0123456789abcdef0123456789abcdef01234567";
    let part = root.join(format!("{nova}.part"));
    write_image(&part, &[Block::Unique(1), Block::Hole, Block::Unique(2)], 0);
    let report = wait_for(&daemon, "skip of the .part file", |r| {
        r["auto_capture"]["skipped"]
            .as_array()
            .is_some_and(|s| s.iter().any(|e| e["kind"] == "temporary-name"))
    });
    assert!(captured_names(&report).is_empty());
    std::fs::rename(&part, root.join(nova)).unwrap();
    let report = wait_for(&daemon, "capture of the renamed file", |r| {
        !captured_names(r).is_empty()
    });
    assert_eq!(captured_names(&report), [nova]);
    // Text output: the table on stdout, what was skipped on stderr.
    let out = daemon.ctl(&["images"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains(nova));
}

#[test]
fn auto_capture_skips_truncated_files_and_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let (daemon, root) = auto_daemon(dir.path());
    // Cut mid-sector: not a raw image (yet).
    let torn = root.join("torn.raw");
    std::fs::write(&torn, vec![7u8; 1000]).unwrap();
    // Captured, then truncated: the catalog's copy no longer matches the file.
    let cut = root.join("cut.raw");
    write_image(&cut, &(0..8).map(Block::Unique).collect::<Vec<_>>(), 0);
    wait_for(&daemon, "capture of cut", |r| captured_names(r) == ["cut"]);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&cut)
        .unwrap()
        .set_len(4 * BLOCK as u64)
        .unwrap();
    let report = wait_for(&daemon, "both skips", |r| {
        r["auto_capture"]["skipped"].as_array().is_some_and(|s| {
            s.iter().any(|e| e["path"] == s_(&torn)) && s.iter().any(|e| e["path"] == s_(&cut))
        })
    });
    let skipped = report["auto_capture"]["skipped"].as_array().unwrap();
    let kind_of = |path: &Path| {
        skipped
            .iter()
            .find(|e| e["path"] == s(path))
            .map(|e| {
                (
                    e["kind"].as_str().unwrap().to_string(),
                    e["reason"].as_str().unwrap().to_string(),
                )
            })
            .unwrap()
    };
    let (kind, reason) = kind_of(&torn);
    assert_eq!(kind, "unaligned-size", "{reason}");
    let (kind, reason) = kind_of(&cut);
    assert_eq!(kind, "image-changed", "{reason}");
    assert!(reason.contains("--recapture"), "{reason}");
    // The catalog keeps what it captured; text output names the skipped files on stderr.
    assert_eq!(captured_names(&report), ["cut"]);
    let out = daemon.ctl(&["images"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("auto-capture skipped") && stderr.contains("torn.raw"),
        "{stderr}"
    );
}

fn s_(path: &Path) -> String {
    s(path).to_string()
}

// ---- content-bound device names, `ensure`, and the libvirt hook ----

/// The kind of error `vmarctl --json ARGS` failed with (panics if it succeeded).
fn error_kind(daemon: &Daemon, args: &[&str]) -> String {
    let (ok, value) = daemon.document(args);
    assert!(!ok, "{args:?} succeeded: {value}");
    assert_shape("error", &value);
    value["error"]["kind"].as_str().unwrap().to_string()
}

#[test]
fn ensure_is_idempotent_and_a_name_remembers_its_content() {
    let dir = tempfile::tempdir().unwrap();
    let paths = images(dir.path());
    let mut daemon = Daemon::start_sim(dir.path(), "");
    capture(&daemon, &paths);
    // Without an image: the image called NAME. Twice: the second finds it serving.
    let (ok, first) = daemon.document(&["ensure", "web"]);
    assert!(ok, "{first}");
    assert_shape("ensure", &first);
    assert_eq!(first["created"], true);
    let (ok, again) = daemon.document(&["ensure", "web", "web"]);
    assert!(ok && again["created"] == false, "{again}");
    assert_eq!(again["fingerprint"], first["fingerprint"]);
    // A live device serving other content is refused, whatever the command.
    assert_eq!(
        error_kind(&daemon, &["ensure", "web", "base"]),
        "name-bound"
    );
    assert_eq!(code(&daemon, &["ensure", "web", "base"]), 5);
    // Another image with the same bytes is the same content.
    assert!(daemon.ctl(&["create", "tmp", "base"]).status.success());
    let (ok, same) = daemon.document(&["ensure", "tmp", "copy"]);
    assert!(ok && same["created"] == false, "{same}");

    // create tmp web; remove tmp; create tmp db: the name remembers base's content.
    assert!(daemon.ctl(&["remove", "tmp"]).status.success());
    let out = daemon.ctl(&["create", "tmp", "web"]);
    assert_eq!(out.status.code(), Some(5));
    let message = String::from_utf8_lossy(&out.stderr);
    assert!(
        message.contains("\"base\"") && message.contains("--rebind") && message.contains("blake3:"),
        "{message}"
    );
    assert_eq!(error_kind(&daemon, &["ensure", "tmp", "web"]), "name-bound");
    // Also after vmard restarts: the binding is in the catalog.
    drop(daemon);
    daemon = Daemon::start_sim(dir.path(), "");
    assert_eq!(error_kind(&daemon, &["create", "tmp", "web"]), "name-bound");
    // `ensure tmp` brings back what it served; the same bytes under another image name are
    // accepted by create.
    let (ok, back) = daemon.document(&["ensure", "tmp"]);
    assert!(
        ok && back["created"] == true && back["image"] == "base",
        "{back}"
    );
    assert!(daemon.ctl(&["remove", "tmp"]).status.success());
    assert!(daemon.ctl(&["create", "tmp", "copy"]).status.success());
    assert!(daemon.ctl(&["remove", "tmp"]).status.success());
    // Re-binding is explicit, and then the name serves the new content.
    let out = daemon.ctl(&["create", "tmp", "web", "--rebind"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(daemon.ctl(&["remove", "tmp"]).status.success());
    let (ok, rebound) = daemon.document(&["ensure", "tmp"]);
    assert!(ok && rebound["image"] == "web", "{rebound}");
    // --rebind never replaces a live device.
    assert_eq!(
        error_kind(&daemon, &["create", "tmp", "base", "--rebind"]),
        "device-exists"
    );
}

#[test]
fn ensure_finds_the_bound_content_under_another_name_and_refuses_changed_content() {
    let dir = tempfile::tempdir().unwrap();
    let paths = images(dir.path());
    let daemon = Daemon::start_sim(dir.path(), "");
    capture(&daemon, &paths);
    // x served "copy"; copy is forgotten; base has the same bytes.
    assert!(daemon.ctl(&["create", "x", "copy"]).status.success());
    assert!(daemon.ctl(&["remove", "x"]).status.success());
    assert!(daemon.ctl(&["forget", "copy"]).status.success());
    let (ok, found) = daemon.document(&["ensure", "x"]);
    assert!(ok && found["image"] == "base", "{found}");
    // y served y.raw; y.raw is rewritten and captured again: other bytes under the name.
    let y = dir.path().join("y.raw");
    write_image(&y, &[Block::Unique(500), Block::Unique(501)], 0);
    capture(&daemon, std::slice::from_ref(&y));
    assert!(daemon.ctl(&["create", "y", "y"]).status.success());
    assert!(daemon.ctl(&["remove", "y"]).status.success());
    assert!(daemon.ctl(&["forget", "y"]).status.success());
    write_image(&y, &[Block::Unique(502), Block::Unique(503)], 0);
    capture(&daemon, std::slice::from_ref(&y));
    assert_eq!(error_kind(&daemon, &["ensure", "y"]), "name-bound");
}

fn qemu_img() -> bool {
    let found = Command::new("qemu-img").arg("--version").output().is_ok();
    if !found {
        assert!(
            std::env::var_os("VMAR_REQUIRE_LIBVIRT").is_none(),
            "qemu-img is missing (apt-get install qemu-utils)"
        );
        eprintln!("skipped: qemu-img not installed");
    }
    found
}

/// A qcow2 overlay at `path` whose header names `backing` as its raw backing file (which
/// need not exist: `rebase -u` does not open it).
fn overlay_over(path: &Path, backing: &str) {
    for args in [
        vec!["create", "-q", "-f", "qcow2", s(path), "1M"],
        vec!["rebase", "-u", "-b", backing, "-F", "raw", s(path)],
    ] {
        let out = Command::new("qemu-img").args(&args).output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// Runs the hook as libvirt does: `vmarctl libvirt-hook DOMAIN OP SUBOP -`, XML on stdin.
fn run_hook(daemon: &Daemon, op: &str, sub: &str, xml: &str) -> std::process::Output {
    let mut child = Command::new(vmarctl_bin())
        .arg("--socket")
        .arg(&daemon.socket)
        .args(["libvirt-hook", "vm1", op, sub, "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(xml.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

fn live_devices(daemon: &Daemon) -> Vec<String> {
    let (ok, list) = daemon.document(&["list"]);
    assert!(ok, "{list}");
    list["devices"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| !d["live"].is_null())
        .map(|d| d["name"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn the_libvirt_hook_ensures_the_devices_of_disks_and_backing_chains() {
    if !qemu_img() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let paths = images(dir.path());
    let daemon = Daemon::start_sim(dir.path(), "");
    capture(&daemon, &paths);
    // Nova's way: an instance disk whose chain is only in its header, over a middle layer.
    let mid = dir.path().join("mid.qcow2");
    overlay_over(&mid, "/dev/vmar/web");
    let disk = dir.path().join("disk");
    overlay_over(&disk, s(&mid));
    let out = Command::new("qemu-img")
        .args(["rebase", "-u", "-b", s(&mid), "-F", "qcow2", s(&disk)])
        .output()
        .unwrap();
    assert!(out.status.success());
    let xml = format!(
        "<domain type='kvm'><name>vm1</name><devices>\
           <disk type='block' device='disk'><driver name='qemu' type='raw'/>\
             <source dev='/dev/mapper/vmar-base'/><target dev='vda'/><readonly/></disk>\
           <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>\
             <source file='{}'/><target dev='vdb'/></disk>\
         </devices></domain>",
        disk.display()
    );
    // Other operations do nothing, whatever they are given.
    let out = run_hook(&daemon, "release", "end", "not xml");
    assert!(out.status.success());
    assert!(live_devices(&daemon).is_empty());
    let out = run_hook(&daemon, "prepare", "begin", &xml);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(live_devices(&daemon), ["base", "web"]);
    // Two domains starting at once on the same devices both get them.
    let both: Vec<_> = (0..2)
        .map(|_| {
            let xml = xml.clone();
            let socket = daemon.socket.clone();
            std::thread::spawn(move || {
                let mut child = Command::new(vmarctl_bin())
                    .arg("--socket")
                    .arg(&socket)
                    .args(["libvirt-hook", "vm2", "prepare", "begin", "-"])
                    .stdin(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .unwrap();
                child
                    .stdin
                    .take()
                    .unwrap()
                    .write_all(xml.as_bytes())
                    .unwrap();
                child.wait_with_output().unwrap()
            })
        })
        .collect();
    for t in both {
        let out = t.join().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert_eq!(live_devices(&daemon), ["base", "web"]);

    // A name whose image was captured again with other bytes fails the start, saying why.
    let y = dir.path().join("y.raw");
    write_image(&y, &[Block::Unique(500), Block::Unique(501)], 0);
    capture(&daemon, std::slice::from_ref(&y));
    assert!(daemon.ctl(&["create", "y", "y"]).status.success());
    assert!(daemon.ctl(&["remove", "y"]).status.success());
    assert!(daemon.ctl(&["forget", "y"]).status.success());
    write_image(&y, &[Block::Unique(502), Block::Unique(503)], 0);
    capture(&daemon, std::slice::from_ref(&y));
    let out = run_hook(
        &daemon,
        "prepare",
        "begin",
        &xml.replace("vmar-base", "vmar-y"),
    );
    assert!(!out.status.success());
    let message = String::from_utf8_lossy(&out.stderr);
    assert!(
        message.contains("vm1")
            && message.contains("/dev/vmar/y")
            && message.contains("served image"),
        "{message}"
    );
    assert!(!live_devices(&daemon).contains(&"y".to_string()));
    // An unknown device name fails the start, naming the device.
    let missing = xml.replace("vmar-base", "vmar-nosuch");
    let out = run_hook(&daemon, "prepare", "begin", &missing);
    assert!(!out.status.success());
    let message = String::from_utf8_lossy(&out.stderr);
    assert!(
        message.contains("/dev/vmar/nosuch") && message.contains("vm1"),
        "{message}"
    );
    // Unparsable XML at prepare fails the start too.
    assert!(
        !run_hook(&daemon, "prepare", "begin", "<domain>")
            .status
            .success()
    );
}

#[test]
fn libvirt_xml_checks_an_existing_overlay_before_printing() {
    if !qemu_img() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let paths = images(dir.path());
    let daemon = Daemon::start_sim(dir.path(), "");
    capture(&daemon, &paths);
    let wrong = dir.path().join("wrong.qcow2");
    overlay_over(&wrong, "/dev/vmar/base");
    assert_eq!(
        error_kind(&daemon, &["libvirt-xml", "web", "--overlay", s(&wrong)]),
        "overlay-mismatch"
    );
    let raw = dir.path().join("plain.raw");
    write_image(&raw, &[Block::Unique(9)], 0);
    let out = daemon.ctl(&["libvirt-xml", "web", "--overlay", s(&raw)]);
    assert_eq!(out.status.code(), Some(5));
    assert!(String::from_utf8_lossy(&out.stderr).contains("must be qcow2"));
    // Refused before anything was created.
    assert!(live_devices(&daemon).is_empty());
}

/// The shipped hook script (packaging/libvirt/qemu-hook) with its binary directory set.
fn hook_script(dir: &Path, bindir: &Path) -> PathBuf {
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/libvirt/qemu-hook"),
    )
    .unwrap()
    .replace("@BINDIR@", s(bindir));
    let path = dir.join("vmar-hook");
    std::fs::write(&path, text).unwrap();
    path
}

fn run_script(script: &Path, socket: &Path, stdin: &str) -> std::process::Output {
    let mut child = Command::new("sh")
        .arg(script)
        .args(["vm1", "prepare", "begin", "-"])
        .env("VMAR_SOCKET", socket)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

#[test]
fn the_shipped_hook_runs_vmarctl_and_does_nothing_once_the_package_is_removed() {
    let dir = tempfile::tempdir().unwrap();
    let paths = images(dir.path());
    let daemon = Daemon::start_sim(dir.path(), "");
    capture(&daemon, &paths);
    let bindir = dir.path().join("bin");
    std::fs::create_dir(&bindir).unwrap();
    std::os::unix::fs::symlink(vmarctl_bin(), bindir.join("vmarctl")).unwrap();
    let xml = "<domain><devices><disk type='block'><source dev='/dev/vmar/web'/>\
               <target dev='vda'/></disk></devices></domain>";
    let script = hook_script(dir.path(), &bindir);
    let out = run_script(&script, &daemon.socket, xml);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(live_devices(&daemon), ["web"]);
    // A bad domain at prepare fails, through the script.
    assert!(
        !run_script(&script, &daemon.socket, "<domain>")
            .status
            .success()
    );
    // `dpkg -r` leaves the conffile without vmarctl: every start must still work.
    std::fs::remove_file(bindir.join("vmarctl")).unwrap();
    let out = run_script(&script, &daemon.socket, "<domain>");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs vmarctl with `args` against `socket`, killing it after `limit`: `None` if it was
/// still waiting then.
fn vmarctl_within(
    socket: &Path,
    args: &[&std::ffi::OsStr],
    limit: Duration,
) -> Option<std::process::Output> {
    let mut child = Command::new(vmarctl_bin())
        .arg("--socket")
        .arg(socket)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if child.try_wait().unwrap().is_some() {
            return Some(child.wait_with_output().unwrap());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}

#[test]
fn a_vmard_that_accepts_but_never_answers_is_given_up_on_with_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("silent.sock");
    // A socket that accepts (in the kernel's backlog, as a stopped vmard's does) and never
    // answers.
    let _listener = UnixListener::bind(&socket).unwrap();
    let args: Vec<&std::ffi::OsStr> = ["--json", "--timeout", "2", "ping"]
        .iter()
        .map(std::ffi::OsStr::new)
        .collect();
    let out = vmarctl_within(&socket, &args, Duration::from_secs(60))
        .expect("vmarctl --timeout 2 still waited after 60 s");
    assert_eq!(out.status.code(), Some(6));
    let value: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(value["error"]["kind"], "daemon-timeout", "{value}");
    let message = value["error"]["message"].as_str().unwrap();
    assert!(message.contains("did not answer within 2 s"), "{message}");
    // VMAR_TIMEOUT does the same.
    let out = Command::new(vmarctl_bin())
        .env("VMAR_TIMEOUT", "2")
        .arg("--socket")
        .arg(&socket)
        .arg("ping")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(6));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("did not answer within 2 s"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_long_request_that_sends_heartbeats_outlives_the_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("fake.sock");
    // vmard working silently on a request but for its heartbeats, longer than the timeout.
    let mut lines: Vec<String> = (0..4)
        .map(|_| r#"{"type":"working"}"#.to_string())
        .collect();
    lines.push(format!(
        r#"{{"type":"ok","result":{{"version":"x","protocol":3,"state_dir":"{}"}}}}"#,
        dir.path().display()
    ));
    let fake = fake_vmard(&socket, lines, Duration::from_millis(1500));
    let args: Vec<&std::ffi::OsStr> = ["--json", "--timeout", "2", "ping"]
        .iter()
        .map(std::ffi::OsStr::new)
        .collect();
    let out = vmarctl_within(&socket, &args, Duration::from_secs(60)).unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    fake.join().unwrap();
}

#[test]
fn arguments_that_are_not_utf8_are_usage_errors_not_panics() {
    use std::os::unix::ffi::OsStrExt;
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("none.sock");
    let bad = std::ffi::OsStr::from_bytes(b"/images/web\xff.raw");
    let os = std::ffi::OsStr::new;
    for args in [
        vec![os("--json"), os("capture"), bad],
        vec![os("--json"), os("map"), bad],
        vec![os("--json"), os("create"), os("vm1"), bad],
        vec![
            os("--json"),
            os("libvirt-xml"),
            os("vm1"),
            os("--overlay"),
            bad,
        ],
        vec![os("--json"), bad],
        // Before --json: vmarctl looked for --json in arguments it took as UTF-8 (a panic).
        vec![os("map"), bad, os("--json")],
    ] {
        let out = vmarctl_within(&socket, &args, Duration::from_secs(60)).unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        let value: Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{args:?}: no JSON ({e}): {stderr}"));
        assert_eq!(value["error"]["kind"], "usage", "{args:?}: {value}");
    }
}

// ---- monitoring and operations (issue 19) ----

#[test]
fn metrics_dependents_and_restore_status_print_their_documented_json() {
    let dir = tempfile::tempdir().unwrap();
    let paths = images(dir.path());
    let daemon = Daemon::start_sim(dir.path(), "");
    capture(&daemon, &paths[..2]);
    assert!(daemon.ctl(&["create", "w", "web"]).status.success());
    for (command, args) in [
        ("metrics", &["metrics"][..]),
        ("dependents", &["dependents", "base"]),
        ("bindings", &["bindings"]),
        ("restore-status", &["restore-status"]),
        ("list", &["list"]),
    ] {
        let (ok, value) = daemon.document(args);
        assert!(ok, "{args:?}: {value}");
        assert_shape(command, &value);
    }
    // stats --interval --json: one document a line.
    let out = daemon.ctl(&["--json", "stats", "--interval", "0.05", "--count", "3"]);
    assert!(out.status.success());
    let lines: Vec<&str> = std::str::from_utf8(&out.stdout).unwrap().lines().collect();
    assert_eq!(lines.len(), 3, "{lines:?}");
    for line in lines {
        assert_shape("stats", &serde_json::from_str(line).unwrap());
    }
}

/// A name remembers its content after `remove`; `bindings` says so, and whether that
/// content can still be served.
#[test]
fn bindings_list_each_name_with_its_content_device_and_whether_it_can_be_served() {
    let dir = tempfile::tempdir().unwrap();
    let paths = images(dir.path());
    let daemon = Daemon::start_sim(dir.path(), "");
    capture(&daemon, &paths[..2]);
    assert!(daemon.ctl(&["create", "w", "web"]).status.success());
    assert!(daemon.ctl(&["create", "b", "base"]).status.success());
    assert!(daemon.ctl(&["remove", "w"]).status.success());
    let binding = |name: &str| {
        let (ok, value) = daemon.document(&["bindings"]);
        assert!(ok, "{value}");
        value["bindings"]
            .as_array()
            .unwrap()
            .iter()
            .find(|b| b["name"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("no binding {name}: {value}"))
    };
    let w = binding("w");
    assert_eq!(w["image"], "web", "{w}");
    assert_eq!(w["node"], "/dev/vmar/w");
    assert_eq!(w["device"], false, "{w}");
    assert_eq!(w["servable"], true, "{w}");
    assert!(
        w["fingerprint"].as_str().unwrap().starts_with("blake3:"),
        "{w}"
    );
    assert_eq!(binding("b")["device"], true);
    // The content goes: the name stays bound, but nothing can serve it.
    assert!(daemon.ctl(&["forget", "web"]).status.success());
    assert_eq!(binding("w")["servable"], false);
    let out = daemon.ctl(&["bindings"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.lines()
            .any(|l| l.split_whitespace().take(4).eq(["w", "web", "no", "no"])),
        "{text}"
    );
}

#[test]
fn stats_options_select_one_table_and_interval_reports_what_was_read_meanwhile() {
    let dir = tempfile::tempdir().unwrap();
    let paths = images(dir.path());
    let daemon = Daemon::start_sim(dir.path(), "");
    capture(&daemon, &paths[..2]);
    assert!(daemon.ctl(&["create", "w", "web"]).status.success());
    let text = |args: &[&str]| {
        let out = daemon.ctl(args);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    // Fields of the image files table: that table alone, one line per file.
    let files = text(&["stats", "--noheadings", "-o", "image_file,cached"]);
    assert_eq!(files.lines().count(), 2, "{files}");
    assert!(files.lines().all(|l| l.starts_with('/')), "{files}");
    // Fields of the devices table: that table alone.
    let devices = text(&["stats", "--noheadings", "-o", "device,read"]);
    assert_eq!(devices.lines().count(), 1, "{devices}");
    assert!(devices.starts_with("w "), "{devices}");
    // Without -o both tables.
    let both = text(&["stats"]);
    assert!(
        both.contains("DEVICE") && both.contains("IMAGE_FILE"),
        "{both}"
    );
    // Fields of both tables: a usage error that names both.
    let out = daemon.ctl(&["stats", "-o", "device,image_file"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("image files"));
    assert_eq!(
        code(&daemon, &["stats", "--count", "2"]),
        2,
        "--count needs --interval"
    );
    assert_eq!(
        code(&daemon, &["stats", "--interval", "0", "--count", "2"]),
        2
    );

    // Reads between two reports show in the second one only.
    let kernel = vmar::kernel::sim::SimKernel::open(&dir.path().join("kernel")).unwrap();
    let mut child = Command::new(vmarctl_bin())
        .arg("--socket")
        .arg(&daemon.socket)
        .args(["--json", "stats", "w", "--interval", "1.5", "--count", "2"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    kernel.read("w", 0, 64 * 1024).unwrap();
    let mut out = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    assert!(child.wait().unwrap().success());
    let reports: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(reports.len(), 2, "{out}");
    assert_eq!(reports[0]["devices"][0]["read"]["total"], 0, "{out}");
    assert_eq!(
        reports[1]["devices"][0]["read"]["total"],
        64 * 1024,
        "{out}"
    );
    assert_eq!(reports[1]["read"]["total"], 64 * 1024, "{out}");
}

#[test]
fn vmard_and_vmar_toml_man_pages_have_every_option_signal_file_and_key() {
    let vmard = common::binary("vmard", env!("CARGO_BIN_EXE_vmard"));
    let page = |arg: &str| {
        let out = Command::new(&vmard).arg(arg).output().unwrap();
        assert!(out.status.success());
        String::from_utf8(out.stdout).unwrap()
    };
    let man8 = page("--man");
    assert!(
        man8.starts_with(".ie") || man8.contains(".TH vmard 8"),
        "{man8}"
    );
    assert!(man8.contains(".TH vmard 8"), "section 8");
    for section in [
        "SIGNALS",
        "FILES",
        "ENVIRONMENT",
        "\"EXIT STATUS\"",
        "\"SEE ALSO\"",
    ] {
        assert!(
            man8.contains(&format!(".SH {section}"))
                || man8.contains(&format!(".SH {}", section.trim_matches('"'))),
            "vmard(8) has no {section}"
        );
    }
    for signal in ["SIGTERM", "SIGHUP", "SIGKILL"] {
        assert!(
            man8.contains(signal),
            "vmard(8) does not say what {signal} does"
        );
    }
    // Every visible option of vmard's --help is on the page.
    let help = Command::new(&vmard).arg("--help").output().unwrap();
    let help = String::from_utf8(help.stdout).unwrap();
    let options: Vec<&str> = help
        .split_whitespace()
        .filter(|w| w.starts_with("--"))
        .map(|w| w.trim_end_matches(','))
        .collect();
    assert!(options.len() >= 12, "{help}");
    for option in options {
        let roff = option.replace('-', "\\-");
        assert!(man8.contains(&roff), "vmard(8) lacks {option}");
    }
    let man5 = page("--man-config");
    assert!(man5.contains(".TH vmar.toml 5"));
    for (key, _, default, _) in vmar::config::KEYS {
        assert!(
            man5.contains(&format!(".BR {key} ")),
            "vmar.toml(5) lacks {key}"
        );
        assert!(
            man5.contains(default),
            "vmar.toml(5) lacks the default of {key}"
        );
    }
    // groff parses both without warnings, when it is installed.
    for roff in [&man8, &man5] {
        let child = Command::new("groff")
            .args(["-man", "-Tutf8", "-ww", "-z"])
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn();
        let Ok(mut child) = child else { continue };
        child
            .stdin
            .take()
            .unwrap()
            .write_all(roff.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.stderr.is_empty(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn the_udev_trigger_names_only_vmars_own_devices() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = tempfile::tempdir().unwrap();
    let sys = dir.path().join("sys/block");
    let images = dir.path().join("images");
    std::fs::create_dir_all(&images).unwrap();
    let config = dir.path().join("vmar.toml");
    std::fs::write(&config, format!("image_roots = [\"{}\"]\n", s(&images))).unwrap();
    let device = |name: &str, files: &[(&str, String)]| {
        for (file, content) in files {
            let path = sys.join(name).join(file);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, format!("{content}\n")).unwrap();
        }
    };
    device("dm-0", &[("dm/uuid", "VMAR-web".into())]);
    device("dm-1", &[("dm/uuid", "LVM-abcdef".into())]);
    device("dm-2", &[("dm/uuid", String::new())]);
    let image = s(&images.join("web.raw")).to_string();
    device(
        "loop0",
        &[("loop/backing_file", image.clone()), ("ro", "1".into())],
    );
    // Writable over an image: someone else's.
    device("loop1", &[("loop/backing_file", image), ("ro", "0".into())]);
    // Read-only, outside the image roots.
    device(
        "loop2",
        &[
            ("loop/backing_file", "/srv/other.iso".into()),
            ("ro", "1".into()),
        ],
    );
    device("loop3", &[("ro", "1".into())]);
    device("sda", &[("ro", "0".into())]);
    let out = Command::new(root.join("packaging/udev/vmar-udev-trigger"))
        .arg("--print")
        .env("VMAR_SYSFS", dir.path().join("sys"))
        .env("VMAR_CONFIG", &config)
        .env(
            "VMAR_LOOP_IMAGE",
            root.join("packaging/udev/vmar-loop-image"),
        )
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "dm-0\nloop0\n");
    // postinst uses it, not a trigger of every dm and loop device.
    let postinst = std::fs::read_to_string(root.join("packaging/deb/postinst")).unwrap();
    assert!(postinst.contains("/usr/lib/vmar/vmar-udev-trigger"));
    assert!(!postinst.contains("--sysname-match"), "{postinst}");
}

#[test]
fn the_sos_plugin_is_valid_python_and_collects_vmarctl_json() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let plugin = root.join("packaging/sos/vmar.py");
    let out = Command::new("python3")
        .args(["-c", "import ast, sys; ast.parse(open(sys.argv[1]).read())"])
        .arg(&plugin)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&plugin).unwrap();
    for wanted in [
        "--json list",
        "--json images",
        "--json stats",
        "--json check",
        "/etc/vmar/vmar.toml",
        "add_journal(units=['vmard'",
    ] {
        assert!(
            text.contains(wanted),
            "the sos plugin does not collect {wanted}"
        );
    }
}

#[test]
fn sidecar_and_fleet_documents_match_the_schema() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("vmar.toml");
    std::fs::write(&config, "sidecars = \"write\"\n").unwrap();
    let daemon = Daemon::start_args(
        dir.path(),
        &dir.path().join("state"),
        &dir.path().join("run/vmard.sock"),
        &[
            "--config",
            s(&config),
            "--sim",
            s(&dir.path().join("kernel")),
        ],
    );
    write_image(
        &dir.path().join("a.raw"),
        &[Block::Shared(1), Block::Zero],
        0,
    );
    let manifest = dir.path().join("fleet.manifest");
    std::fs::write(&manifest, "a.raw\n").unwrap();
    let (ok, doc) = daemon.document(&["capture", "--manifest", s(&manifest), "--host", "h1"]);
    assert!(ok, "{doc}");
    assert_shape("capture", &doc);
    assert_eq!(
        doc["images"][0]["result"]["sidecar"]["written"], true,
        "{doc}"
    );
    let (ok, doc) = daemon.document(&["fleet-status", s(&manifest)]);
    assert!(ok, "{doc}");
    assert_shape("fleet-status", &doc);
}

#[test]
fn auto_capture_does_not_take_a_forgotten_image_back_until_it_changes() {
    let dir = tempfile::tempdir().unwrap();
    let (daemon, root) = auto_daemon(dir.path());
    let path = root.join("old.raw");
    write_image(&path, &(0..4).map(Block::Unique).collect::<Vec<_>>(), 0);
    wait_for(&daemon, "capture of old", |r| captured_names(r) == ["old"]);
    let (ok, _) = daemon.document(&["forget", "old"]);
    assert!(ok);
    // The file is still in the root at the next start: it stays forgotten.
    drop(daemon);
    let (daemon, _) = auto_daemon(dir.path());
    let report = wait_for(&daemon, "skip of the forgotten image", |r| {
        r["auto_capture"]["skipped"].as_array().is_some_and(|s| {
            s.iter()
                .any(|e| e["path"] == s_(&path) && e["kind"] == "forgotten")
        })
    });
    assert!(captured_names(&report).is_empty(), "{report:#}");
    // Changed since: a new image to take.
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .open(&path)
        .unwrap();
    file.write_all(&common::block_bytes(&Block::Unique(9)))
        .unwrap();
    drop(file);
    let report = wait_for(&daemon, "capture of the changed file", |r| {
        captured_names(r) == ["old"]
    });
    assert_eq!(report["images"][0]["size"], 5 * BLOCK);
}

#[test]
fn a_recapture_clears_auto_captures_stale_changed_skip() {
    let dir = tempfile::tempdir().unwrap();
    let (daemon, root) = auto_daemon(dir.path());
    let cut = root.join("cut.raw");
    write_image(&cut, &(0..8).map(Block::Unique).collect::<Vec<_>>(), 0);
    wait_for(&daemon, "capture of cut", |r| captured_names(r) == ["cut"]);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&cut)
        .unwrap()
        .set_len(4 * BLOCK as u64)
        .unwrap();
    let skipped_cut = |r: &Value| {
        r["auto_capture"]["skipped"]
            .as_array()
            .is_some_and(|s| s.iter().any(|e| e["path"] == s_(&cut)))
    };
    wait_for(&daemon, "the image-changed skip", skipped_cut);
    let (ok, out) = daemon.document(&["capture", "--recapture", s(&cut)]);
    assert!(ok, "{out}");
    let report = auto_report(&daemon);
    assert!(!skipped_cut(&report), "stale skip left: {report:#}");
    let out = daemon.ctl(&["images"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("cut.raw"), "{stderr}");
}
