//! Helpers shared by the integration tests: images built from a description of their blocks.
#![allow(dead_code)]

use std::collections::HashMap;
use std::fs::File;
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

use serde_json::Value;

use vmar::map::Source;

pub const BLOCK: usize = 4096;

/// One block of a test image.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Block {
    /// Never written: a hole in the sparse file.
    Hole,
    /// Written as zeros.
    Zero,
    /// Content shared between images: the same `u8` gives the same bytes everywhere.
    Shared(u8),
    /// Content unique to this image and position.
    Unique(u64),
}

/// Bytes of a block (full size).
/// The blocks of the test family base, web and db, 64 blocks each: holes every 10th block
/// and zeros after them; web has its own blocks from 40, db every 5th block.
pub fn family_blocks() -> [Vec<Block>; 3] {
    let base: Vec<Block> = (0..64)
        .map(|i| match i % 10 {
            0 => Block::Hole,
            1 => Block::Zero,
            _ => Block::Shared((i % 40) as u8),
        })
        .collect();
    let mut web = base.clone();
    for (i, b) in web.iter_mut().enumerate().skip(40) {
        *b = Block::Unique(i as u64);
    }
    let mut db = base.clone();
    for (i, b) in db.iter_mut().enumerate().step_by(5) {
        *b = Block::Unique(1000 + i as u64);
    }
    [base, web, db]
}

/// The paths `dir/base.raw`, `dir/web.raw`, `dir/db.raw` of the test family.
pub fn family_paths(dir: &Path) -> Vec<PathBuf> {
    ["base", "web", "db"]
        .iter()
        .map(|n| dir.join(format!("{n}.raw")))
        .collect()
}

pub fn block_bytes(block: &Block) -> Vec<u8> {
    match block {
        Block::Hole | Block::Zero => vec![0; BLOCK],
        Block::Shared(n) => pattern(0x5348_4152_4544_0000 + u64::from(*n)),
        Block::Unique(n) => pattern(0x554e_4951_0000_0000 ^ n),
    }
}

/// Pseudo-random but reproducible block content from a seed (never all zero).
fn pattern(seed: u64) -> Vec<u8> {
    // splitmix64 of the seed: distinct seeds give distinct, non-zero xorshift states.
    let mut x = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^= x >> 31;
    if x == 0 {
        x = 1;
    }
    let mut out = Vec::with_capacity(BLOCK);
    while out.len() < BLOCK {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out
}

/// Writes an image of `blocks`, the last one cut to `tail` bytes (a multiple of 512, 0 for a
/// full block). Holes are left unwritten so the file is sparse.
pub fn write_image(path: &Path, blocks: &[Block], tail: usize) -> u64 {
    let mut file = File::create(path).unwrap();
    let mut size = (blocks.len() * BLOCK) as u64;
    if tail > 0 && !blocks.is_empty() {
        size -= (BLOCK - tail) as u64;
    }
    for (i, block) in blocks.iter().enumerate() {
        if *block == Block::Hole {
            continue;
        }
        let offset = (i * BLOCK) as u64;
        let len = usize::try_from((size - offset).min(BLOCK as u64)).unwrap();
        file.seek(SeekFrom::Start(offset)).unwrap();
        file.write_all(&block_bytes(block)[..len]).unwrap();
    }
    file.set_len(size).unwrap();
    size
}

/// Expected source of every block of every image, computed independently of vmar: the first
/// occurrence of a content in capture order is canonical, later ones redirect to it.
/// A partial block's content includes its length.
pub fn expected_sources(images: &[(Vec<Block>, usize)], ids: &[u32]) -> Vec<Vec<Source>> {
    let mut first: HashMap<(Block, usize), (u32, u64)> = HashMap::new();
    let mut all = Vec::new();
    for ((blocks, tail), id) in images.iter().zip(ids) {
        let mut sources = Vec::new();
        for (i, block) in blocks.iter().enumerate() {
            let len = if i + 1 == blocks.len() && *tail > 0 {
                *tail
            } else {
                BLOCK
            };
            let source = match block {
                Block::Hole | Block::Zero => Source::Zero,
                content => match first.get(&(content.clone(), len)) {
                    Some(&(image, block)) => Source::Redirect { image, block },
                    None => {
                        first.insert((content.clone(), len), (*id, i as u64));
                        Source::Own
                    }
                },
            };
            sources.push(source);
        }
        all.push(sources);
    }
    all
}

/// A vmard running for one test; killed when dropped.
pub struct Daemon {
    child: Child,
    pub socket: PathBuf,
    pub state: PathBuf,
}

impl Daemon {
    pub fn start(dir: &Path) -> Daemon {
        Daemon::start_with(dir, &dir.join("state"), &dir.join("run/vmard.sock"))
    }

    pub fn start_with(dir: &Path, state: &Path, socket: &Path) -> Daemon {
        Daemon::start_args(dir, state, socket, &[])
    }

    /// Starts vmard with extra arguments; `dir` is its image root.
    pub fn start_args(dir: &Path, state: &Path, socket: &Path, args: &[&str]) -> Daemon {
        Daemon::start_env(dir, state, socket, args, &[])
    }

    /// Starts vmard on the simulated kernel in `dir/kernel`, with `faults` as VMAR_FAULTS
    /// (empty: none). `dir` is its image root and holds its state and socket.
    pub fn start_sim(dir: &Path, faults: &str) -> Daemon {
        let kernel = dir.join("kernel");
        Daemon::start_env(
            dir,
            &dir.join("state"),
            &dir.join("run/vmard.sock"),
            &["--sim", s(&kernel)],
            &[("VMAR_FAULTS", faults)],
        )
    }

    /// Starts vmard with extra arguments and environment; `dir` is its image root.
    pub fn start_env(
        dir: &Path,
        state: &Path,
        socket: &Path,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Daemon {
        let mut daemon = Daemon::spawn(
            vmard(dir, state, socket, args).envs(env.iter().copied()),
            state,
            socket,
        );
        assert!(daemon.ready(), "vmard exited before answering");
        daemon
    }

    /// Starts vmard like [`Daemon::start_env`], but a vmard that exits before answering is
    /// an `Err` with what it wrote on stderr (kept in `state`'s sibling `.stderr` file).
    pub fn try_start_env(
        dir: &Path,
        state: &Path,
        socket: &Path,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Result<Daemon, String> {
        let log = state.with_extension("stderr");
        let mut daemon = Daemon::spawn(
            vmard(dir, state, socket, args)
                .envs(env.iter().copied())
                .stderr(File::create(&log).unwrap()),
            state,
            socket,
        );
        if daemon.ready() {
            Ok(daemon)
        } else {
            Err(std::fs::read_to_string(&log).unwrap_or_default())
        }
    }

    /// Runs `command` (from [`vmard`], with this state dir and socket) as the daemon of a
    /// test, without waiting for it.
    fn spawn(command: &mut Command, state: &Path, socket: &Path) -> Daemon {
        Daemon {
            child: command.spawn().expect("vmard starts"),
            socket: socket.to_path_buf(),
            state: state.to_path_buf(),
        }
    }

    /// Waits until vmard answers (true) or exits (false), at most 20 s.
    pub fn ready(&mut self) -> bool {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if self.ctl(&["ping"]).status.success() {
                return true;
            }
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("vmard did not answer within 20 s");
    }

    /// Starts vmard on the simulated kernel in `dir/kernel` with `faults`, without waiting
    /// for it: for faults at start-up. See [`Daemon::ready`].
    pub fn launch_sim(dir: &Path, faults: &str) -> Daemon {
        Daemon::spawn(
            sim_vmard(dir, &[]).env("VMAR_FAULTS", faults),
            &dir.join("state"),
            &dir.join("run/vmard.sock"),
        )
    }

    pub fn ctl(&self, args: &[&str]) -> Output {
        vmarctl(&self.socket, args)
    }

    /// Runs vmarctl --json and returns its exit status and parsed stdout, with the lists of
    /// `capture` and `list` taken out of their documents (`{"version":1,"images":[...]}`,
    /// `{"version":1,"devices":[...]}`) so that tests index them directly; tests/cli.rs checks
    /// the documents themselves. See [`Daemon::document`].
    pub fn json(&self, args: &[&str]) -> (bool, Value) {
        let (ok, mut value) = self.document(args);
        let list = match args.iter().find(|a| !a.starts_with('-')) {
            Some(&"capture") => "images",
            Some(&"list") => "devices",
            _ => return (ok, value),
        };
        if value.get(list).is_some() {
            value = value[list].take();
        }
        (ok, value)
    }

    /// Runs vmarctl --json and returns its exit status and the document it printed.
    pub fn document(&self, args: &[&str]) -> (bool, Value) {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        let out = self.ctl(&all);
        let value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "vmarctl {args:?} printed no JSON ({e}): {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        });
        (out.status.success(), value)
    }

    /// Sends `signal` to vmard.
    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.child.id()).unwrap());
        nix::sys::signal::kill(pid, signal).unwrap();
    }

    /// Sends SIGTERM and returns the exit status.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        self.signal(nix::sys::signal::Signal::SIGTERM);
        self.child.wait().unwrap()
    }

    /// Whether the process has exited (e.g. killed by an injected fault), waiting up to 5 s:
    /// a client sees the connection close a moment before the process can be reaped.
    pub fn exited(&mut self) -> bool {
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    }

    pub fn stop(mut self) -> PathBuf {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.state.clone()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// vmard's command line for a test: `dir` is its image root, then `args`, its state dir
/// and socket; it logs errors only (VMAR_TEST_LOG sets another level).
pub fn vmard(dir: &Path, state: &Path, socket: &Path, args: &[&str]) -> Command {
    let mut command = Command::new(binary("vmard", env!("CARGO_BIN_EXE_vmard")));
    command
        .env(
            "VMAR_LOG",
            std::env::var("VMAR_TEST_LOG").unwrap_or_else(|_| "error".into()),
        )
        .arg("--image-root")
        .arg(dir)
        .args(args)
        .arg("--state-dir")
        .arg(state)
        .arg("--socket")
        .arg(socket);
    command
}

/// [`vmard`] on the simulated kernel in `dir/kernel`, with `dir` its image root and the
/// state and socket in it (as [`Daemon::start_sim`] has them), then `args`.
pub fn sim_vmard(dir: &Path, args: &[&str]) -> Command {
    let kernel = dir.join("kernel");
    let mut all = vec!["--sim", s(&kernel)];
    all.extend_from_slice(args);
    vmard(dir, &dir.join("state"), &dir.join("run/vmard.sock"), &all)
}

/// `vmarctl --json ARGS` of `daemon`, which must succeed: what it printed (see
/// [`Daemon::json`]).
pub fn ok(daemon: &Daemon, args: &[&str]) -> Value {
    let (ok, out) = daemon.json(args);
    assert!(ok, "vmarctl {args:?}: {out}");
    out
}

/// `vmarctl --json ARGS` of `daemon`, which must fail: the kind of its error (of the first
/// image's, for capture, which answers one entry per image).
pub fn err(daemon: &Daemon, args: &[&str]) -> String {
    let (ok, out) = daemon.json(args);
    assert!(!ok, "vmarctl {args:?} succeeded: {out}");
    let error = if out.is_array() {
        &out[0]["error"]
    } else {
        &out["error"]
    };
    error["kind"].as_str().unwrap_or("?").to_string()
}

/// Captures `images` one by one; each must succeed.
pub fn capture_all(daemon: &Daemon, images: &[PathBuf]) {
    for image in images {
        ok(daemon, &["capture", s(image)]);
    }
}

/// (name, state) of every device `vmarctl list` shows.
pub fn device_states(daemon: &Daemon) -> Vec<(String, String)> {
    ok(daemon, &["list"])
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            let field = |f: &str| d[f].as_str().unwrap().to_string();
            (field("name"), field("state"))
        })
        .collect()
}

/// A project binary: from `VMAR_BIN_DIR` when set (the kernel test guest, where the build
/// tree is not mounted), else where cargo built it.
pub fn binary(name: &str, built: &str) -> PathBuf {
    match std::env::var_os("VMAR_BIN_DIR") {
        Some(dir) => Path::new(&dir).join(name),
        None => PathBuf::from(built),
    }
}

pub fn vmarctl(socket: &Path, args: &[&str]) -> Output {
    Command::new(binary("vmarctl", env!("CARGO_BIN_EXE_vmarctl")))
        .arg("--socket")
        .arg(socket)
        .args(args)
        .output()
        .expect("vmarctl runs")
}

pub fn s(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// Makes a block-device node at `at` for the device node `of` names: another name of it.
pub fn alias_node(of: &Path, at: &Path) {
    use std::os::unix::fs::MetadataExt;
    let rdev = std::fs::metadata(of).unwrap().rdev();
    nix::sys::stat::mknod(
        at,
        nix::sys::stat::SFlag::S_IFBLK,
        nix::sys::stat::Mode::from_bits_truncate(0o600),
        rdev,
    )
    .unwrap_or_else(|e| panic!("mknod {}: {e}", at.display()));
}

impl Daemon {
    /// vmard's process id (for /proc/PID/io).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Bytes vmard has read through read(2)/pread(2) so far (`rchar` of /proc/PID/io): a
    /// capture that reads an image adds at least its data.
    pub fn rchar(&self) -> u64 {
        let io = std::fs::read_to_string(format!("/proc/{}/io", self.pid())).unwrap();
        io.lines()
            .find_map(|l| l.strip_prefix("rchar: "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap()
    }
}
