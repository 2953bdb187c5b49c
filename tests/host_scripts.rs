//! The shell helpers the package installs on the host: `vmar-devnode` (udev's helper that
//! makes and removes `/dev/vmar/NAME` nodes) and `vmar-apparmor` (the line that lets
//! libvirt's virt-aa-helper read them). Each runs here against a temporary directory through
//! the variables it reads for tests; the real udev and AppArmor run them in tools/kernel-test.py
//! and tools/system-test.

use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

struct DevNodes {
    dir: tempfile::TempDir,
}

impl DevNodes {
    fn new() -> Self {
        DevNodes {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn nodes(&self) -> PathBuf {
        self.dir.path().join("dev/vmar")
    }

    fn run(&self, args: &[&str]) -> Output {
        Command::new(root().join("udev/vmar-devnode"))
            .args(args)
            .env("VMAR_DEVNODE_DIR", self.nodes())
            .env("VMAR_DEVNODE_LOCK", self.dir.path().join("lock"))
            .env("VMAR_SYSFS", self.dir.path().join("sys"))
            .output()
            .unwrap()
    }

    fn ok(&self, args: &[&str]) {
        let out = self.run(args);
        assert!(out.status.success(), "vmar-devnode {args:?}: {out:?}");
    }

    /// A live dm device `major:minor` named `dm_name`, as sysfs shows it.
    fn live(&self, major: u32, minor: u32, dm_name: &str) {
        let dm = self
            .dir
            .path()
            .join(format!("sys/dev/block/{major}:{minor}/dm"));
        std::fs::create_dir_all(&dm).unwrap();
        std::fs::write(dm.join("name"), format!("{dm_name}\n")).unwrap();
    }
}

fn rdev(major: u32, minor: u32) -> u64 {
    nix::sys::stat::makedev(major.into(), minor.into())
}

fn is_root() -> bool {
    let root = nix::unistd::Uid::effective().is_root();
    if !root {
        eprintln!("skipped: mknod of block device nodes needs root");
    }
    root
}

#[test]
fn vmar_devnode_makes_a_block_node_and_keeps_it_while_it_is_the_devices() {
    if !is_root() {
        return;
    }
    let d = DevNodes::new();
    let web = d.nodes().join("web");
    d.ok(&["add", "vmar-web", "253", "5"]);
    let meta = std::fs::symlink_metadata(&web).unwrap();
    assert!(meta.file_type().is_block_device(), "{meta:?}");
    assert_eq!(meta.rdev(), rdev(253, 5));
    assert_eq!(meta.permissions().mode() & 0o7777, 0o640);
    if let Ok(Some(disk)) = nix::unistd::Group::from_name("disk") {
        assert_eq!(meta.gid(), disk.gid.as_raw());
    }
    // libvirt gave the node to a VM's QEMU; a change event must not take it back.
    nix::unistd::chown(&web, Some(nix::unistd::Uid::from_raw(4321)), None).unwrap();
    d.ok(&["add", "vmar-web", "253", "5"]);
    let again = std::fs::symlink_metadata(&web).unwrap();
    assert_eq!((again.ino(), again.uid()), (meta.ino(), 4321));
    // The name now serves another device: the node is replaced.
    d.ok(&["add", "vmar-web", "253", "9"]);
    assert_eq!(
        std::fs::symlink_metadata(&web).unwrap().rdev(),
        rdev(253, 9)
    );
    // The old device's late remove event leaves the new node; the new device's removes it.
    d.ok(&["remove", "vmar-web", "253", "5"]);
    assert_eq!(
        std::fs::symlink_metadata(&web).unwrap().rdev(),
        rdev(253, 9)
    );
    d.ok(&["remove", "vmar-web", "253", "9"]);
    assert!(!web.exists());
    // A symlink left by the rules of older versions is replaced by a node.
    std::os::unix::fs::symlink("../dm-3", &web).unwrap();
    d.ok(&["add", "vmar-web", "253", "3"]);
    assert!(
        std::fs::symlink_metadata(&web)
            .unwrap()
            .file_type()
            .is_block_device()
    );
    // Nothing but the node is left in the directory.
    let names: Vec<_> = std::fs::read_dir(d.nodes())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["web"]);
}

#[test]
fn vmar_devnode_refuses_names_that_are_not_vmar_device_names() {
    let d = DevNodes::new();
    for (name, major, minor) in [
        ("vmar-../escape", "253", "1"),
        ("vmar-a/b", "253", "1"),
        ("vmar-.hidden", "253", "1"),
        ("vmar--dash", "253", "1"),
        ("vmar-", "253", "1"),
        ("vmar-ok", "x", "1"),
        ("vmar-ok", "253", ""),
    ] {
        let out = d.run(&["add", name, major, minor]);
        assert_eq!(
            out.status.code(),
            Some(2),
            "{name} {major}:{minor}: {out:?}"
        );
        assert!(!String::from_utf8_lossy(&out.stderr).is_empty());
    }
    assert!(!d.dir.path().join("dev/escape").exists());
    assert!(!d.nodes().join("ok").exists());
    assert_eq!(d.run(&["add", "vmar-ok"]).status.code(), Some(2));
    assert_eq!(
        d.run(&["rename", "vmar-ok", "253", "1"]).status.code(),
        Some(2)
    );
}

#[test]
fn vmar_devnode_sweep_removes_nodes_that_name_no_live_device_of_their_name() {
    if !is_root() {
        return;
    }
    let d = DevNodes::new();
    d.ok(&["add", "vmar-live", "253", "7"]);
    d.ok(&["add", "vmar-reused", "253", "8"]);
    d.ok(&["add", "vmar-gone", "253", "10"]);
    d.live(253, 7, "vmar-live");
    // 253:8 now belongs to someone else's device (an LVM volume, say).
    d.live(253, 8, "vg-lv");
    std::os::unix::fs::symlink("../dm-4", d.nodes().join("old-link")).unwrap();
    d.ok(&["sweep"]);
    let mut names: Vec<_> = std::fs::read_dir(d.nodes())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["live", "old-link"]);
}

#[test]
fn the_udev_rule_makes_and_removes_nodes_through_vmar_devnode() {
    let rules = std::fs::read_to_string(root().join("udev/61-vmar.rules")).unwrap();
    let active: Vec<&str> = rules
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .collect();
    let text = active.join("\n");
    assert!(
        text.contains("RUN+=\"vmar-devnode add $env{DM_NAME} $major $minor\""),
        "{text}"
    );
    assert!(
        text.contains("RUN+=\"vmar-devnode remove $env{DM_NAME} $major $minor\""),
        "{text}"
    );
    // No symlink under /dev/vmar: AppArmor would see /dev/dm-N through it.
    assert!(!text.contains("SYMLINK+=\"vmar/"), "{text}");
    let makefile = std::fs::read_to_string(root().join("Makefile")).unwrap();
    assert!(makefile.contains("udev/vmar-devnode $(DESTDIR)/lib/udev/vmar-devnode"));
}

struct AppArmor {
    dir: tempfile::TempDir,
}

impl AppArmor {
    /// An /etc/apparmor.d with libvirt's virt-aa-helper profile and, if `local` is given,
    /// its site-specific include.
    fn new(local: Option<&str>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let etc = dir.path().join("apparmor.d");
        std::fs::create_dir_all(etc.join("local")).unwrap();
        std::fs::write(
            etc.join("usr.lib.libvirt.virt-aa-helper"),
            "profile virt-aa-helper {}\n",
        )
        .unwrap();
        if let Some(local) = local {
            std::fs::write(etc.join("local/usr.lib.libvirt.virt-aa-helper"), local).unwrap();
        }
        let parser = dir.path().join("apparmor_parser");
        std::fs::write(
            &parser,
            format!(
                "#!/bin/sh\necho \"$*\" >> {}\n",
                dir.path().join("parser.log").display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&parser, std::fs::Permissions::from_mode(0o755)).unwrap();
        AppArmor { dir }
    }

    fn etc(&self) -> PathBuf {
        self.dir.path().join("apparmor.d")
    }

    fn run(&self, action: &str) -> Output {
        Command::new(root().join("packaging/apparmor/vmar-apparmor"))
            .arg(action)
            .env("VMAR_APPARMOR_DIR", self.etc())
            .env(
                "VMAR_APPARMOR_PARSER",
                self.dir.path().join("apparmor_parser"),
            )
            .output()
            .unwrap()
    }

    fn local(&self) -> String {
        std::fs::read_to_string(self.etc().join("local/usr.lib.libvirt.virt-aa-helper"))
            .unwrap_or_default()
    }

    fn reloads(&self) -> Vec<String> {
        std::fs::read_to_string(self.dir.path().join("parser.log"))
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }
}

const INCLUDE: &str = "include if exists <abstractions/vmar-virt-aa-helper>";

#[test]
fn vmar_apparmor_adds_its_line_once_and_removes_exactly_it() {
    let admin = "# Site-specific additions\n/srv/isos/** r,\n";
    let aa = AppArmor::new(Some(admin));
    assert_eq!(aa.run("status").status.code(), Some(1));
    assert!(aa.run("add").status.success());
    let local = aa.local();
    assert!(local.starts_with(admin), "{local}");
    assert_eq!(
        local.lines().filter(|l| *l == INCLUDE).count(),
        1,
        "{local}"
    );
    let profile = aa.etc().join("usr.lib.libvirt.virt-aa-helper");
    assert_eq!(
        aa.reloads(),
        [format!("-r -T -W {}", profile.display())],
        "the profile is reloaded once"
    );
    // Again (an upgrade): nothing changes, nothing is reloaded.
    assert!(aa.run("add").status.success());
    assert_eq!(aa.local(), local);
    assert_eq!(aa.reloads().len(), 1);
    assert_eq!(aa.run("status").status.code(), Some(0));
    // Removal leaves the administrator's lines as they were.
    assert!(aa.run("remove").status.success());
    assert_eq!(aa.local(), admin);
    assert_eq!(aa.reloads().len(), 2);
    assert_eq!(aa.run("status").status.code(), Some(1));
    assert!(aa.run("remove").status.success());
    assert_eq!(aa.reloads().len(), 2);
}

#[test]
fn vmar_apparmor_makes_the_include_when_libvirt_made_none_and_does_nothing_without_apparmor() {
    let aa = AppArmor::new(None);
    assert!(aa.run("add").status.success());
    assert!(aa.local().lines().any(|l| l == INCLUDE), "{}", aa.local());
    // No /etc/apparmor.d at all: nothing is made.
    let none = tempfile::tempdir().unwrap();
    let out = Command::new(root().join("packaging/apparmor/vmar-apparmor"))
        .arg("add")
        .env("VMAR_APPARMOR_DIR", none.path().join("apparmor.d"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(!none.path().join("apparmor.d").exists());
    assert_eq!(aa.run("bogus").status.code(), Some(2));
}

#[test]
fn the_apparmor_snippet_lets_virt_aa_helper_read_vmar_nodes_only() {
    let snippet =
        std::fs::read_to_string(root().join("packaging/apparmor/vmar-virt-aa-helper")).unwrap();
    let rules: Vec<&str> = snippet
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    assert_eq!(rules, ["/dev/vmar/ r,", "/dev/vmar/* r,"]);
    let makefile = std::fs::read_to_string(root().join("Makefile")).unwrap();
    assert!(makefile.contains("$(DESTDIR)/etc/apparmor.d/abstractions/vmar-virt-aa-helper"));
    let conffiles = std::fs::read_to_string(root().join("packaging/deb/conffiles")).unwrap();
    assert!(conffiles.contains("/etc/apparmor.d/abstractions/vmar-virt-aa-helper"));
    let postinst = std::fs::read_to_string(root().join("packaging/deb/postinst")).unwrap();
    assert!(postinst.contains("/usr/lib/vmar/vmar-apparmor add"));
    let prerm = std::fs::read_to_string(root().join("packaging/deb/prerm")).unwrap();
    assert!(prerm.contains("/usr/lib/vmar/vmar-apparmor remove"));
}
