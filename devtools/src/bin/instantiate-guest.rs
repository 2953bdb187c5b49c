//! Guest side of `tools/bench-instantiate.py`: replays the reads of N VMs starting together,
//! once through plain read-only loop devices of their raw images and once through vmar
//! devices, from a cold page cache, and prints one `BENCH: {json}` line per run.
//!
//! A "VM start" is a process, in a cgroup of its own as libvirt runs each VM (the loop driver
//! serves each cgroup's I/O with its own worker), that mounts the image's ext4 partition
//! read-only from its block device and reads every file of its list (the files its boot and
//! its application touch) with O_DIRECT, so the only page cache involved is the one under the
//! block device, of the image *files*: the host cache VMAR shares. Plain: a buffered loop device over the image file at the
//! partition's offset. vmar: a dm `linear` partition device over `/dev/mapper/vmar-NAME`.
//! Bytes read come from /proc/diskstats of the disk holding the images, page cache from
//! /proc/meminfo, both through procfs.
//!
//! `--workload trace` replays instead the disk reads that real boots of the images made
//! (tools/trace-boot.py), phase by phase (OS, then application, without dropping the cache in
//! between), in order and with O_DIRECT, at the queue depth the guest used, over the whole
//! image: `plain` through a buffered read-only loop device of the image file, `vmar` through
//! /dev/mapper/vmar-NAME, and the path libvirt uses, a qcow2 overlay whose raw backing file is
//! the image file (`qemu-plain`) or the vmar device (`qemu-vmar`), read by QEMU's own block
//! layer (`qemu-io -t none`, i.e. `cache=none`).
//!
//! Prefetch paths (trace workload): before the timed rounds, a recording pass replays each
//! image's traced boot on its vmar device alone, from a cold cache, phase by phase, and has
//! vmard record what it served (`vmarctl record NAME --phase os|app --replace`: dm-stats read
//! areas x page-cache residency, as on a host; the cache is dropped before each phase's
//! replay so that each phase's set holds that phase's reads). Then in each round, before
//! each phase: `vmar+prefetch` has vmard warm the N devices' sets of that phase (`vmarctl
//! warm NAME... --phase P`: their union, every shared block once) and then starts the
//! replays; `vmar+prefetch-during` starts the warm together with the replays;
//! `vmar+prefetch-gap0` is `vmar+prefetch` with `prefetch_merge_gap = 0` (vmard's
//! configuration rewritten and reloaded with SIGHUP); `plain+prefetch` reads each image's
//! own recorded set from its own file (sorted and merged by the same rule, no sharing, the
//! same reader in the idle I/O class) before the replays through plain loop devices. The
//! prefetch's time is part of the phase's time.
//!
//! Not a tool to run by hand: it expects the guest `tools/bench-instantiate.py` boots.

use std::fmt::Write as _;
use std::fs::{self, File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::Parser;
use loopdev::{LoopControl, LoopDevice};
use procfs::{Current, Meminfo};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use vmar::prefetch::io as pio;
use vmar::units::usize_of;
use vmar::workset::{self, Canonical, MergePolicy, Run};

/// Offset of the ext4 partition in the images tools/make-images.py builds.
const PARTITION_OFFSET: u64 = 1 << 20;

#[derive(Parser, Debug)]
struct Args {
    /// Start one VM and print what it read: DEVICE MOUNTPOINT LIST (internal).
    #[arg(long, num_args = 3, value_names = ["DEVICE", "DIR", "LIST"])]
    start_vm: Option<Vec<PathBuf>>,
    /// Directory holding NAME.raw for each image.
    #[arg(long, default_value = "/images")]
    images: PathBuf,
    /// Directory holding NAME.list: paths (in the image's file system) to read.
    #[arg(long, default_value = "/bench/lists")]
    lists: PathBuf,
    /// Images in capture order; N images means the first N.
    #[arg(long, value_delimiter = ',')]
    names: Vec<String>,
    /// Numbers of images started together.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4")]
    ns: Vec<usize>,
    #[arg(long, default_value_t = 1)]
    rounds: usize,
    /// The disk (name in /proc/diskstats) that holds the images.
    #[arg(long, default_value = "vda")]
    disk: String,
    #[arg(long, default_value = "vmarctl")]
    vmarctl: PathBuf,
    #[arg(long, default_value = "/run/vmard.sock")]
    socket: PathBuf,
    /// cgroup v2 hierarchy where each VM gets a cgroup (none: all VMs share one).
    #[arg(long, default_value = "/sys/fs/cgroup")]
    cgroups: PathBuf,
    /// `files` (read the listed files) or `trace` (replay traced boots).
    #[arg(long, default_value = "files")]
    workload: String,
    /// Directory holding NAME.os.trace and NAME.app.trace (trace workload).
    #[arg(long, default_value = "/bench/traces")]
    traces: PathBuf,
    /// Sets of images started together, as LABEL=NAME,NAME,... (trace workload; N images
    /// of a set are its first N). Without it, one set `main` of --names.
    #[arg(long = "set")]
    sets: Vec<String>,
    /// Paths the trace workload reads the images through.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "plain,vmar,qemu-plain,qemu-vmar"
    )]
    paths: Vec<String>,
    /// Where the qemu paths put their qcow2 overlays (a file system with O_DIRECT).
    #[arg(long, default_value = "/overlays")]
    overlays: PathBuf,
    /// Replay one trace on one device: DEVICE TRACE (internal).
    #[arg(long, num_args = 2, value_names = ["DEVICE", "TRACE"])]
    replay: Option<Vec<PathBuf>>,
    /// vmard's configuration file (rewritten, and vmard reloaded, by `vmar+prefetch-gap0`).
    #[arg(long, default_value = vmar::config::DEFAULT_CONFIG)]
    vmard_config: PathBuf,
}

/// The phases of a traced boot, in order.
const PHASES: [&str; 2] = ["os", "app"];

/// How a path of the trace workload prefetches before (or while) its replays run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Prefetch {
    None,
    /// Each image's own set from its own file (plain images).
    Own,
    /// `vmarctl warm` of the N devices: before the replays, or while they run.
    Warm {
        during: bool,
    },
}

/// A path of the trace workload: how images are reached, how they are prefetched, and the
/// merge gap vmard warms with (`None`: its configured one).
struct PathSpec {
    access: String,
    prefetch: Prefetch,
    merge_gap: Option<u64>,
}

fn path_spec(path: &str) -> Result<PathSpec> {
    let (access, prefetch, merge_gap) = match path {
        "plain" | "vmar" | "qemu-plain" | "qemu-vmar" => (path, Prefetch::None, None),
        "plain+prefetch" => ("plain", Prefetch::Own, None),
        "vmar+prefetch" => ("vmar", Prefetch::Warm { during: false }, None),
        "vmar+prefetch-during" => ("vmar", Prefetch::Warm { during: true }, None),
        "vmar+prefetch-gap0" => ("vmar", Prefetch::Warm { during: false }, Some(0)),
        _ => bail!(
            "unknown path {path} (plain, vmar, qemu-plain, qemu-vmar, plain+prefetch, vmar+prefetch, vmar+prefetch-during, vmar+prefetch-gap0)"
        ),
    };
    Ok(PathSpec {
        access: access.to_string(),
        prefetch,
        merge_gap,
    })
}

/// Recorded working sets in image blocks, by (image, phase), as `vmarctl working-set
/// --extents` gives them.
type Sets = BTreeMap<(String, String), Vec<Run>>;

/// One traced phase of one image: its reads (offset, bytes) in order and the queue depth
/// the guest used.
struct Trace {
    reads: Vec<(u64, u64)>,
    queue_depth: usize,
}

/// Reads a trace file: a line `qd K`, then one `OFFSET BYTES` line per read.
fn read_trace(path: &Path) -> Result<Trace> {
    let text = fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut trace = Trace {
        reads: Vec::new(),
        queue_depth: 1,
    };
    for line in text.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        match fields.as_slice() {
            ["qd", k] => trace.queue_depth = k.parse::<usize>()?.max(1),
            [offset, bytes] => trace.reads.push((offset.parse()?, bytes.parse()?)),
            [] => {}
            _ => bail!("{}: bad line {line:?}", path.display()),
        }
    }
    Ok(trace)
}

/// A read widened to 4 KiB boundaries, so that O_DIRECT accepts it on every device.
fn aligned(offset: u64, bytes: u64) -> (u64, u64) {
    let start = offset & !4095;
    let end = (offset + bytes + 4095) & !4095;
    (start, end - start)
}

/// Replays a trace on a device with O_DIRECT: `queue_depth` threads take the reads in
/// order, so that at most that many are in flight. Returns (requests, bytes).
fn replay(device: &Path, trace: &Path) -> Result<(u64, u64)> {
    let trace = read_trace(trace)?;
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_DIRECT)
        .open(device)
        .with_context(|| format!("opening {}", device.display()))?;
    // A block device's size is where a seek to its end lands (its metadata says 0).
    let size = std::io::Seek::seek(&mut &file, std::io::SeekFrom::End(0))?;
    let next = AtomicUsize::new(0);
    let largest = trace
        .reads
        .iter()
        .map(|&(o, b)| aligned(o, b).1)
        .max()
        .unwrap_or(4096);
    let results: Vec<Result<u64>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..trace.queue_depth)
            .map(|_| {
                scope.spawn(|| -> Result<u64> {
                    let mut buffer = vec![0u8; usize_of(largest) + 4096];
                    let skip = buffer.as_ptr().align_offset(4096);
                    let mut bytes = 0;
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(&(offset, length)) = trace.reads.get(i) else {
                            return Ok(bytes);
                        };
                        let (start, mut length) = aligned(offset, length);
                        if size > 0 {
                            length = length.min(size.saturating_sub(start));
                        }
                        let chunk = &mut buffer[skip..skip + usize_of(length)];
                        file.read_exact_at(chunk, start).with_context(|| {
                            format!("reading {length} bytes at {start} of {}", device.display())
                        })?;
                        bytes += length;
                    }
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| bail!("a replay thread panicked"))
            })
            .collect()
    });
    let mut bytes = 0;
    for r in results {
        bytes += r?;
    }
    Ok((trace.reads.len() as u64, bytes))
}

/// qemu-io commands replaying a trace: batches of `queue_depth` asynchronous reads, each
/// batch waited for before the next (QEMU's block layer keeps them in flight together).
fn qemu_io_commands(trace: &Trace) -> String {
    let mut out = String::new();
    for batch in trace.reads.chunks(trace.queue_depth) {
        for &(offset, bytes) in batch {
            let (start, length) = aligned(offset, bytes);
            let _ = writeln!(out, "aio_read -q {start} {length}");
        }
        out.push_str("aio_flush\n");
    }
    out
}

fn vmarctl(args: &Args, command: &[&str]) -> Result<Value> {
    let out = Command::new(&args.vmarctl)
        .arg("--socket")
        .arg(&args.socket)
        .arg("--json")
        .args(command)
        .output()
        .with_context(|| format!("running {}", args.vmarctl.display()))?;
    let value: Value = serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "vmarctl {command:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })?;
    if !out.status.success() {
        bail!("vmarctl {command:?} failed: {value}");
    }
    Ok(value)
}

fn run(program: &str, args: &[&str]) -> Result<()> {
    let status = Command::new(program)
        .args(args)
        .status()
        .with_context(|| format!("running {program}"))?;
    if !status.success() {
        bail!("{program} {args:?}: {status}");
    }
    Ok(())
}

/// What the disk and the page cache say at one moment.
struct Snapshot {
    sectors_read: u64,
    reads: u64,
    cached: u64,
}

fn snapshot(disk: &str) -> Result<Snapshot> {
    let stat = procfs::diskstats()?
        .into_iter()
        .find(|d| d.name == disk)
        .with_context(|| format!("no disk {disk} in /proc/diskstats"))?;
    Ok(Snapshot {
        sectors_read: stat.sectors_read,
        reads: stat.reads,
        cached: Meminfo::current()?.cached,
    })
}

impl Snapshot {
    /// What happened between `self` and the later `after`, as the results report it.
    fn delta(&self, after: &Snapshot) -> Value {
        json!({
            "disk_bytes_read": (after.sectors_read - self.sectors_read) * 512,
            "disk_reads": after.reads - self.reads,
            "cached_bytes": after.cached as i64 - self.cached as i64,
        })
    }
}

/// `fields` with `more`'s fields added.
fn merged(mut fields: Value, more: Value) -> Value {
    if let (Some(fields), Value::Object(more)) = (fields.as_object_mut(), more) {
        fields.extend(more);
    }
    fields
}

fn drop_caches() -> Result<()> {
    nix::unistd::sync();
    fs::write("/proc/sys/vm/drop_caches", "3").context("dropping caches")
}

/// The block device of one image's partition for one mode, and how to take it down.
enum Partition {
    Loop(LoopDevice, PathBuf),
    Dm(String),
}

impl Partition {
    fn path(&self) -> PathBuf {
        match self {
            Partition::Loop(_, path) => path.clone(),
            Partition::Dm(name) => Path::new("/dev/mapper").join(name),
        }
    }

    fn plain(image: &Path) -> Result<Partition> {
        let device = LoopControl::open()?.next_free()?;
        device
            .with()
            .offset(PARTITION_OFFSET)
            .read_only(true)
            .attach(image)
            .with_context(|| format!("attaching {}", image.display()))?;
        let path = device.path().context("loop device without a path")?;
        Ok(Partition::Loop(device, path))
    }

    fn vmar(name: &str, image: &Path) -> Result<Partition> {
        let sectors = fs::metadata(image)?.len() / 512 - PARTITION_OFFSET / 512;
        let dm_name = format!("bench-{name}-p1");
        let table = format!(
            "0 {sectors} linear /dev/mapper/vmar-{name} {}",
            PARTITION_OFFSET / 512
        );
        run(
            "dmsetup",
            &["create", &dm_name, "--readonly", "--table", &table],
        )?;
        Ok(Partition::Dm(dm_name))
    }

    fn remove(self) -> Result<()> {
        match self {
            Partition::Loop(device, _) => device.detach().context("detaching loop device"),
            Partition::Dm(name) => run("dmsetup", &["remove", &name]),
        }
    }
}

/// Mounts `device` read-only at `dir` and reads every file of `list` with O_DIRECT.
/// Returns (files read, bytes read).
fn start_vm(device: &Path, dir: &Path, list: &Path) -> Result<(u64, u64)> {
    let list = fs::read_to_string(list).with_context(|| format!("reading {}", list.display()))?;
    fs::create_dir_all(dir)?;
    run(
        "mount",
        &[
            "-t",
            "ext4",
            "-o",
            "ro,noload",
            &device.to_string_lossy(),
            &dir.to_string_lossy(),
        ],
    )?;
    let mut buffer = vec![0u8; 2 << 20];
    let aligned = buffer.as_ptr().align_offset(4096);
    let chunk = &mut buffer[aligned..aligned + (1 << 20)];
    let (mut files, mut bytes) = (0, 0);
    for path in list.lines() {
        let full = dir.join(path.trim_start_matches('/'));
        let mut file: File = OpenOptions::new()
            .read(true)
            .custom_flags(nix::libc::O_DIRECT)
            .open(&full)
            .with_context(|| format!("opening {}", full.display()))?;
        loop {
            let n = file
                .read(chunk)
                .with_context(|| format!("reading {}", full.display()))?;
            if n == 0 {
                break;
            }
            bytes += n as u64;
        }
        files += 1;
    }
    Ok((files, bytes))
}

fn one_run(args: &Args, mode: &str, n: usize, round: usize) -> Result<Value> {
    let names = &args.names[..n];
    let mut partitions = Vec::new();
    for name in names {
        let image = args.images.join(format!("{name}.raw"));
        partitions.push(match mode {
            "plain" => Partition::plain(&image)?,
            _ => Partition::vmar(name, &image)?,
        });
    }
    let cgroups = vm_cgroups(&args.cgroups, n)?;
    let _ = Command::new("udevadm").arg("settle").status();
    let stats_before = (mode == "vmar")
        .then(|| vmarctl(args, &["stats"]))
        .transpose()?;
    drop_caches()?;
    let before = snapshot(&args.disk)?;
    let started = Instant::now();
    let mut children = Vec::new();
    for (i, (name, partition)) in names.iter().zip(&partitions).enumerate() {
        let list = args.lists.join(format!("{name}.list"));
        let dir = Path::new("/mnt/bench").join(name);
        // The shell joins the VM's cgroup, then becomes the VM.
        let join = match &cgroups {
            Some(dirs) => format!("echo 0 > {}/cgroup.procs && ", dirs[i].display()),
            None => String::new(),
        };
        let child = Command::new("sh")
            .arg("-c")
            .arg(format!("{join}exec \"$@\""))
            .arg("sh")
            .arg(std::env::current_exe()?)
            .arg("--start-vm")
            .args([partition.path(), dir, list])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .context("starting a VM process")?;
        children.push(child);
    }
    let outcomes: Vec<Result<(u64, u64, f64)>> = std::thread::scope(|scope| {
        let handles: Vec<_> = children
            .into_iter()
            .map(|child| {
                scope.spawn(move || {
                    let out = child.wait_with_output()?;
                    let secs = started.elapsed().as_secs_f64();
                    if !out.status.success() {
                        bail!("a VM process failed: {}", out.status);
                    }
                    let read: Value = serde_json::from_slice(&out.stdout)?;
                    let field = |f: &str| read[f].as_u64().unwrap_or(0);
                    Ok((field("files"), field("bytes"), secs))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| bail!("a waiter panicked")))
            .collect()
    });
    let seconds = started.elapsed().as_secs_f64();
    let after = snapshot(&args.disk)?;
    let stats_after = (mode == "vmar")
        .then(|| vmarctl(args, &["stats"]))
        .transpose()?;
    for name in names {
        let _ = run("umount", &[&format!("/mnt/bench/{name}")]);
    }
    for partition in partitions {
        partition.remove()?;
    }
    let mut per_vm = Vec::new();
    for (name, outcome) in names.iter().zip(outcomes) {
        let (files, bytes, secs) = outcome?;
        per_vm.push(json!({"image": name, "files": files, "file_bytes": bytes, "seconds": secs}));
    }
    let mut result = merged(
        json!({
            "mode": mode,
            "n": n,
            "round": round,
            "seconds": seconds,
            "cgroup_per_vm": cgroups.is_some(),
            "vms": per_vm,
        }),
        before.delta(&after),
    );
    if let (Some(b), Some(a)) = (stats_before, stats_after) {
        let class = |v: &Value, c: &str| v["read"]["by_class"][c].as_u64().unwrap_or(0);
        result["vmar_stats"] = json!({
            "redirected_bytes": class(&a, "redirected") - class(&b, "redirected"),
            "own_bytes": class(&a, "own") - class(&b, "own"),
            "zero_bytes": class(&a, "zero") - class(&b, "zero"),
            "sharing_factor": a["sharing_factor"],
        });
    }
    Ok(result)
}

/// One cgroup per VM under `root`, with the io controller enabled so that block I/O is
/// accounted to it; None when there is no cgroup v2 hierarchy.
fn vm_cgroups(root: &Path, n: usize) -> Result<Option<Vec<PathBuf>>> {
    if !root.join("cgroup.controllers").exists() {
        return Ok(None);
    }
    fs::write(root.join("cgroup.subtree_control"), "+io").context("enabling the io controller")?;
    (0..n)
        .map(|i| {
            let dir = root.join(format!("vm{i}"));
            fs::create_dir_all(&dir)?;
            Ok(dir)
        })
        .collect::<Result<Vec<_>>>()
        .map(Some)
}

/// How one image is reached on one path of the trace workload, and how to take it down.
enum Access {
    /// A read-only loop device over the image file, or the vmar device.
    Device(Option<LoopDevice>, PathBuf),
    /// A qcow2 overlay over a raw backing file, read by qemu-io.
    Qemu(PathBuf),
}

impl Access {
    fn open(path: &str, name: &str, image: &Path, overlays: &Path) -> Result<Access> {
        let vmar = Path::new("/dev/mapper").join(format!("vmar-{name}"));
        Ok(match path {
            "plain" => {
                let device = LoopControl::open()?.next_free()?;
                device
                    .with()
                    .read_only(true)
                    .attach(image)
                    .with_context(|| format!("attaching {}", image.display()))?;
                let dev = device.path().context("loop device without a path")?;
                Access::Device(Some(device), dev)
            }
            "vmar" => Access::Device(None, vmar),
            "qemu-plain" | "qemu-vmar" => {
                let backing = if path == "qemu-plain" {
                    image.to_path_buf()
                } else {
                    vmar
                };
                let overlay = overlays.join(format!("{name}.qcow2"));
                let _ = fs::remove_file(&overlay);
                run(
                    "qemu-img",
                    &[
                        "create",
                        "-q",
                        "-f",
                        "qcow2",
                        "-F",
                        "raw",
                        "-b",
                        &backing.to_string_lossy(),
                        &overlay.to_string_lossy(),
                    ],
                )?;
                Access::Qemu(overlay)
            }
            _ => bail!("unknown path {path} (plain, vmar, qemu-plain, qemu-vmar)"),
        })
    }

    /// The command line of one VM replaying `trace` (a file of qemu-io commands for qemu).
    fn command(&self, trace: &Path, commands: &Path) -> Result<Vec<String>> {
        Ok(match self {
            Access::Device(_, device) => vec![
                std::env::current_exe()?.to_string_lossy().into_owned(),
                "--replay".into(),
                device.to_string_lossy().into_owned(),
                trace.to_string_lossy().into_owned(),
            ],
            Access::Qemu(overlay) => {
                fs::write(commands, qemu_io_commands(&read_trace(trace)?))?;
                vec![
                    "sh".into(),
                    "-c".into(),
                    format!(
                        "qemu-io -t none -n -f qcow2 {} < {} > /dev/null",
                        overlay.display(),
                        commands.display()
                    ),
                ]
            }
        })
    }

    fn close(self) -> Result<()> {
        match self {
            Access::Device(Some(device), _) => device.detach().context("detaching loop device"),
            Access::Device(None, _) => Ok(()),
            Access::Qemu(overlay) => Ok(fs::remove_file(overlay)?),
        }
    }
}

/// Starts the N VMs of one phase together, each a process in its own cgroup, and measures
/// them until the last one is done. With a prefetch, its time counts: the phase starts when
/// the prefetch does.
fn trace_phase(
    args: &Args,
    names: &[String],
    paths: &[Access],
    phase: &str,
    prefetch: Prefetch,
    sets: &Sets,
) -> Result<Value> {
    let cgroups = vm_cgroups(&args.cgroups, names.len())?;
    let mut commands = Vec::new();
    let mut trace_bytes = 0;
    for (name, path) in names.iter().zip(paths) {
        let trace = args.traces.join(format!("{name}.{phase}.trace"));
        trace_bytes += read_trace(&trace)?.reads.iter().map(|r| r.1).sum::<u64>();
        commands.push(path.command(&trace, Path::new(&format!("/tmp/{name}.{phase}.qemu-io")))?);
    }
    let before = snapshot(&args.disk)?;
    let started = Instant::now();
    let mut prefetched = None;
    if prefetch == Prefetch::Own {
        let report = own_prefetch(&args.images, names, phase, sets)?;
        prefetched = Some((
            report,
            started.elapsed().as_secs_f64(),
            snapshot(&args.disk)?,
        ));
    } else if prefetch == (Prefetch::Warm { during: false }) {
        let report = warm(args, names, phase)?;
        prefetched = Some((
            report,
            started.elapsed().as_secs_f64(),
            snapshot(&args.disk)?,
        ));
    }
    let replays_started = started.elapsed().as_secs_f64();
    let mut children = Vec::new();
    for (i, command) in commands.iter().enumerate() {
        let join = match &cgroups {
            Some(dirs) => format!("echo 0 > {}/cgroup.procs && ", dirs[i].display()),
            None => String::new(),
        };
        children.push(
            Command::new("sh")
                .arg("-c")
                .arg(format!("{join}exec \"$@\""))
                .arg("sh")
                .args(command)
                .stdout(std::process::Stdio::null())
                .spawn()
                .context("starting a VM process")?,
        );
    }
    let (seconds, during) = std::thread::scope(|scope| -> Result<_> {
        // The warm runs beside the VMs, as vmard's background warm after `ensure` would.
        let warming = (prefetch == Prefetch::Warm { during: true }).then(|| {
            scope.spawn(|| -> Result<(Value, f64)> {
                let report = warm(args, names, phase)?;
                Ok((report, started.elapsed().as_secs_f64()))
            })
        });
        let mut seconds = Vec::new();
        for mut child in children {
            let status = child.wait()?;
            seconds.push(started.elapsed().as_secs_f64());
            if !status.success() {
                bail!("a VM process failed in phase {phase}: {status}");
            }
        }
        let during = match warming {
            Some(h) => Some(h.join().unwrap_or_else(|_| bail!("the warm panicked"))?),
            None => None,
        };
        Ok((seconds, during))
    })?;
    let wall = started.elapsed().as_secs_f64();
    let after = snapshot(&args.disk)?;
    let mut result = merged(
        json!({
            "phase": phase,
            "seconds": wall,
            "vm_seconds": seconds,
            "trace_bytes": trace_bytes,
            "cgroup_per_vm": cgroups.is_some(),
        }),
        before.delta(&after),
    );
    if let Some((report, secs, mid)) = prefetched {
        // Before the replays: the disk's figures split at the end of the prefetch.
        result["prefetch"] = merged(
            json!({"seconds": secs, "during": false, "report": report}),
            before.delta(&mid),
        );
        result["replay"] = merged(
            json!({"seconds": wall - replays_started}),
            mid.delta(&after),
        );
    }
    if let Some((report, secs)) = during {
        // Beside the replays: the disk cannot tell whose reads were whose; the warm's own
        // report can.
        result["prefetch"] = json!({
            "seconds": secs,
            "during": true,
            "report": report,
            "disk_bytes_read": report["read_bytes"],
            "disk_reads": report["reads"],
        });
    }
    Ok(result)
}

/// `vmarctl warm` of the N devices' sets of `phase` (their union, as vmard reads it).
fn warm(args: &Args, names: &[String], phase: &str) -> Result<Value> {
    let mut command = vec!["warm"];
    command.extend(names.iter().map(String::as_str));
    command.extend(["--phase", phase]);
    let report = vmarctl(args, &command)?;
    if let Some(errors) = report["errors"].as_array()
        && !errors.is_empty()
    {
        bail!("warm of {names:?} failed: {report}");
    }
    Ok(report)
}

/// Per-image prefetch on plain images, the baseline: each image's own recorded set of
/// `phase`, read from its own file with the rule vmard's warm uses (less what is cached,
/// merged across the same gaps, in disk order, one 1 MiB buffer, readahead off, idle I/O
/// class), one image after the other, nothing shared. Returns figures like a warm report's.
fn own_prefetch(images: &Path, names: &[String], phase: &str, sets: &Sets) -> Result<Value> {
    let policy = MergePolicy::default();
    let names = names.to_vec();
    let images = images.to_path_buf();
    let sets = sets.clone();
    let phase = phase.to_string();
    // A thread of its own: the idle class is set on the calling thread.
    std::thread::spawn(move || -> Result<Value> {
        let _ = pio::lower_priority();
        let (mut set_bytes, mut cached_bytes, mut requests, mut request_bytes) = (0, 0, 0, 0);
        let (mut read_bytes, mut reads, mut gap_bytes) = (0, 0, 0);
        for (i, name) in names.iter().enumerate() {
            let Some(runs) = sets.get(&(name.clone(), phase.clone())) else {
                continue;
            };
            let id = u32::try_from(i)?;
            let own = workset::union(
                runs.iter()
                    .map(|r| Canonical {
                        image: id,
                        start: r.start,
                        len: r.len,
                    })
                    .collect(),
            );
            set_bytes += workset::blocks(runs) * 4096;
            let path = images.join(format!("{name}.raw"));
            let file = File::open(&path).with_context(|| format!("opening {}", path.display()))?;
            let size = file.metadata()?.len();
            let cached = pio::cached_runs(&file, &path, size, &own)?;
            cached_bytes += cached.iter().map(|c| c.len).sum::<u64>() * 4096;
            let rest = workset::subtract(&own, &cached);
            let mut planned = workset::requests(&rest, |_| size, policy);
            workset::order(&mut planned, |r| pio::physical_offset(&file, r.offset));
            let open = |_| pio::open_for_reading(&path).ok().map(|f| (f, name.clone()));
            let outcome = pio::read_requests(&open, &planned, &|| false, &mut |_| {});
            if !outcome.errors.is_empty() {
                bail!("prefetch of {name} failed: {:?}", outcome.errors);
            }
            requests += planned.len() as u64;
            request_bytes += planned.iter().map(|r| r.len).sum::<u64>();
            gap_bytes += planned.iter().map(|r| r.len - r.wanted).sum::<u64>();
            read_bytes += outcome.bytes;
            reads += outcome.reads;
        }
        Ok(json!({
            "set_bytes": set_bytes,
            "cached_bytes": cached_bytes,
            "requests": requests,
            "request_bytes": request_bytes,
            "gap_bytes": gap_bytes,
            "read_bytes": read_bytes,
            "reads": reads,
            "merge_gap": policy.max_gap,
        }))
    })
    .join()
    .unwrap_or_else(|_| bail!("the prefetch thread panicked"))
}

/// Points vmard's configuration at merge gap `gap` (`None`: the default) and reloads it.
fn set_merge_gap(args: &Args, gap: Option<u64>) -> Result<()> {
    if let Some(dir) = args.vmard_config.parent() {
        fs::create_dir_all(dir)?;
    }
    let text = gap.map_or(String::new(), |g| format!("prefetch_merge_gap = {g}\n"));
    fs::write(&args.vmard_config, text)
        .with_context(|| format!("writing {}", args.vmard_config.display()))?;
    run("sh", &["-c", "kill -HUP $(pidof vmard)"])?;
    // vmard reloads on its signal thread; a warm planned after this sees the new gap (the
    // report's gap_bytes are checked).
    std::thread::sleep(std::time::Duration::from_secs(1));
    Ok(())
}

/// The recording pass: each image's traced boot replayed alone on its vmar device from a
/// cold cache, phase by phase, and recorded by vmard as it would on a host (`vmarctl record
/// NAME --phase P --replace`: the device's dm-stats read areas x page-cache residency).
/// The cache is dropped before each phase's replay, so each phase's set is what that phase
/// read. Returns the sets as stored (image blocks).
fn record_sets(args: &Args, names: &[&String]) -> Result<Sets> {
    let mut sets = Sets::new();
    for name in names {
        let device = Path::new("/dev/mapper").join(format!("vmar-{name}"));
        for phase in PHASES {
            drop_caches()?;
            let trace = args.traces.join(format!("{name}.{phase}.trace"));
            let started = Instant::now();
            let (requests, bytes) = replay(&device, &trace)?;
            let replayed = started.elapsed().as_secs_f64();
            let out = vmarctl(args, &["record", name, "--phase", phase, "--replace"])?;
            println!(
                "BENCH: {}",
                json!({"record": name, "phase": phase, "replay_requests": requests,
                       "replay_bytes": bytes, "replay_seconds": replayed, "result": out})
            );
        }
        let shown = vmarctl(args, &["working-set", name, "--extents"])?;
        for set in shown["sets"].as_array().into_iter().flatten() {
            let phase = set["phase"].as_str().unwrap_or_default().to_string();
            let runs = set["extents"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|e| {
                    Some(Run {
                        start: e[0].as_u64()?,
                        len: e[1].as_u64()?,
                    })
                })
                .collect();
            sets.insert(((*name).clone(), phase), runs);
        }
    }
    Ok(sets)
}

/// One start of N VMs on one path: the OS phase from a cold cache, then the application
/// phase. Returns one result per phase.
fn trace_run(
    args: &Args,
    set: &str,
    names: &[String],
    path: &str,
    round: usize,
    sets: &Sets,
) -> Result<Vec<Value>> {
    let spec = path_spec(path)?;
    let mut paths = Vec::new();
    for name in names {
        paths.push(Access::open(
            &spec.access,
            name,
            &args.images.join(format!("{name}.raw")),
            &args.overlays,
        )?);
    }
    let _ = Command::new("udevadm").arg("settle").status();
    drop_caches()?;
    if spec.merge_gap.is_some() {
        set_merge_gap(args, spec.merge_gap)?;
    }
    let mut results = Vec::new();
    for phase in PHASES {
        let mut r = trace_phase(args, names, &paths, phase, spec.prefetch, sets)?;
        if let Some(gap) = spec.merge_gap {
            let gaps = r["prefetch"]["report"]["gap_bytes"].as_u64().unwrap_or(0);
            if gap == 0 && gaps > 0 {
                bail!("vmard still merges across gaps after the reload ({gaps} gap bytes)");
            }
            r["merge_gap"] = json!(gap);
        }
        r["workload"] = json!("trace");
        r["set"] = json!(set);
        r["mode"] = json!(path);
        r["n"] = json!(names.len());
        r["round"] = json!(round);
        r["images"] = json!(names);
        results.push(r);
    }
    if spec.merge_gap.is_some() {
        set_merge_gap(args, None)?;
    }
    for p in paths {
        p.close()?;
    }
    Ok(results)
}

/// The sets of the trace workload: (label, names).
fn sets(args: &Args) -> Result<Vec<(String, Vec<String>)>> {
    if args.sets.is_empty() {
        return Ok(vec![("main".into(), args.names.clone())]);
    }
    args.sets
        .iter()
        .map(|s| {
            let (label, names) = s
                .split_once('=')
                .with_context(|| format!("bad set {s:?}"))?;
            Ok((
                label.to_string(),
                names.split(',').map(String::from).collect(),
            ))
        })
        .collect()
}

fn main() -> Result<()> {
    let args = Args::parse();
    if let Some(r) = &args.replay {
        let (requests, bytes) = replay(&r[0], &r[1])?;
        println!("{}", json!({"requests": requests, "bytes": bytes}));
        return Ok(());
    }
    if let Some(vm) = &args.start_vm {
        let (files, bytes) = start_vm(&vm[0], &vm[1], &vm[2])?;
        println!("{}", json!({"files": files, "bytes": bytes}));
        return Ok(());
    }
    let sets = sets(&args)?;
    let mut capture: Vec<&String> = Vec::new();
    for name in args.names.iter().chain(sets.iter().flat_map(|(_, n)| n)) {
        if !capture.contains(&name) {
            capture.push(name);
        }
    }
    for name in capture {
        let image = args.images.join(format!("{name}.raw"));
        let started = Instant::now();
        let out = vmarctl(&args, &["capture", &image.to_string_lossy()])?;
        let captured = started.elapsed().as_secs_f64();
        vmarctl(&args, &["create", name, name])?;
        let summary = &out[0]["result"]["image"]["summary"];
        println!(
            "BENCH: {}",
            json!({"capture": name, "seconds": captured, "summary": summary})
        );
    }
    if args.workload == "trace" {
        for path in &args.paths {
            path_spec(path)?;
        }
        let mut recorded = Sets::new();
        if args.paths.iter().any(|p| p.contains("prefetch")) {
            let mut names: Vec<&String> = Vec::new();
            for name in sets.iter().flat_map(|(_, n)| n) {
                if !names.contains(&name) {
                    names.push(name);
                }
            }
            recorded = record_sets(&args, &names).context("recording the working sets")?;
        }
        for round in 0..args.rounds {
            // A set's first N images that an earlier set already started together (the
            // eight-image set begins with the main four) are not run twice in a round.
            let mut started: Vec<&[String]> = Vec::new();
            for (label, names) in &sets {
                for &n in &args.ns {
                    if n > names.len() || started.contains(&&names[..n]) {
                        continue;
                    }
                    started.push(&names[..n]);
                    for path in &args.paths {
                        let results = trace_run(&args, label, &names[..n], path, round, &recorded)
                            .with_context(|| format!("{path} run of {label} with {n} images"))?;
                        for r in results {
                            println!("BENCH: {r}");
                        }
                    }
                }
            }
        }
        return Ok(());
    }
    for round in 0..args.rounds {
        for &n in &args.ns {
            if n > args.names.len() {
                bail!("{n} images asked for, {} given", args.names.len());
            }
            for mode in ["plain", "vmar"] {
                let result = one_run(&args, mode, n, round)
                    .with_context(|| format!("{mode} run with {n} images"))?;
                println!("BENCH: {result}");
            }
        }
    }
    Ok(())
}
