//! Guest side of `tools/bench-instantiate`: replays the reads of N VMs starting together,
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
//! Not a tool to run by hand: it expects the guest `tools/bench-instantiate` boots.

use std::fs::{self, File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::Parser;
use loopdev::{LoopControl, LoopDevice};
use procfs::{Current, Meminfo};
use serde_json::{Value, json};

/// Offset of the ext4 partition in the images tools/make-images builds.
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
    let mut result = json!({
        "mode": mode,
        "n": n,
        "round": round,
        "seconds": seconds,
        "disk_bytes_read": (after.sectors_read - before.sectors_read) * 512,
        "disk_reads": after.reads - before.reads,
        "cached_bytes": after.cached as i64 - before.cached as i64,
        "cgroup_per_vm": cgroups.is_some(),
        "vms": per_vm,
    });
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

fn main() -> Result<()> {
    let args = Args::parse();
    if let Some(vm) = &args.start_vm {
        let (files, bytes) = start_vm(&vm[0], &vm[1], &vm[2])?;
        println!("{}", json!({"files": files, "bytes": bytes}));
        return Ok(());
    }
    for name in &args.names {
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
