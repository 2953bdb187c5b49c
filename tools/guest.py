"""Shared by tools/kernel-test.py and tools/bench-instantiate.py: a QEMU guest booting Debian's own
kernel from a small initramfs (busybox, chosen kernel modules with their dependencies,
Debian's udev with dmsetup's dm rules and vmar's rules, and vmar's binaries with their shared
libraries), whose /init prints results on the serial console and powers off.

The host kernel has no device-mapper; Debian's kernel in the guest has. Downloads (once,
cached in work/kernel): the linux-image package that linux-image-amd64 depends on, and udev,
with apt-get download. Installs with apt-get, if missing: qemu-system-x86, busybox-static,
cpio, dmsetup. Uses TCG: nested KVM hangs on hosts like ours (VMAR_KERNEL_TEST_KVM=1 tries it).
"""

import glob
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "work" / "kernel"
# Modules every guest loads: device-mapper with the zero target, and loop devices.
MODULES = ["dm-mod", "dm-zero", "loop"]


def log(message):
    print(f"{Path(sys.argv[0]).name}: {message}", file=sys.stderr, flush=True)


def run(cmd, **kw):
    return subprocess.run(cmd, check=True, **kw)


def ensure_packages():
    need = {"qemu-system-x86_64": "qemu-system-x86", "busybox": "busybox-static",
            "cpio": "cpio", "dmsetup": "dmsetup"}
    missing = [pkg for tool, pkg in need.items() if shutil.which(tool) is None]
    if Path("/bin/busybox").exists() and "busybox-static" in missing:
        missing.remove("busybox-static")
    if missing:
        log(f"installing {' '.join(missing)}")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        run(["apt-get", "update", "-qq"], env=env)
        run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing], env=env)


def kernel_package():
    out = run(["apt-cache", "depends", "linux-image-amd64"], capture_output=True,
              text=True).stdout
    for line in out.splitlines():
        m = re.match(r"\s*Depends:\s*(linux-image-[0-9][^\s]*-amd64)\s*$", line)
        if m:
            return m.group(1)
    sys.exit("cannot find the kernel package linux-image-amd64 depends on")


def fetch_kernel():
    WORK.mkdir(parents=True, exist_ok=True)
    package = kernel_package()
    root = WORK / package
    if not (root / "done").exists():
        log(f"downloading {package}")
        for old in WORK.glob(f"{package}_*.deb"):
            old.unlink()
        run(["apt-get", "download", package], cwd=WORK, stdout=subprocess.DEVNULL)
        deb = next(WORK.glob(f"{package}_*.deb"))
        shutil.rmtree(root, ignore_errors=True)
        run(["dpkg-deb", "-x", str(deb), str(root)])
        (root / "done").touch()
    vmlinuz = next(root.glob("boot/vmlinuz-*"))
    release = vmlinuz.name[len("vmlinuz-"):]
    return vmlinuz, root / "lib" / "modules" / release


def fetch_udev():
    """Debian's udev (systemd-udevd), extracted once: the devicemapper crate needs udev
    running, and its dm rules make /dev/mapper nodes and complete the crate's cookies."""
    root = WORK / "udev-root"
    if not (root / "done").exists():
        log("downloading udev")
        for old in WORK.glob("udev_*.deb"):
            old.unlink()
        run(["apt-get", "download", "udev"], cwd=WORK, stdout=subprocess.DEVNULL)
        shutil.rmtree(root, ignore_errors=True)
        run(["dpkg-deb", "-x", str(next(WORK.glob("udev_*.deb"))), str(root)])
        (root / "done").touch()
    return root


def module_files(moddir, modules):
    """Module files (relative to moddir) for `modules` and their dependencies, dependencies
    first. Dependencies come from each module's .modinfo `depends=` field, since the package
    ships no modules.dep and depmod may not be installed."""
    def norm(name):
        return name.replace("-", "_")

    index = {}
    for path in moddir.glob("kernel/**/*.ko*"):
        index[norm(path.name.split(".ko")[0])] = path.relative_to(moddir)
    builtin = {norm(Path(line).name.split(".ko")[0])
               for line in (moddir / "modules.builtin").read_text().split()}
    order = []

    def depends(path):
        data = (moddir / path).read_bytes()
        if path.suffix == ".xz":
            data = run(["xz", "-dc"], input=data, capture_output=True).stdout
        elif path.suffix == ".zst":
            data = run(["zstd", "-dqc"], input=data, capture_output=True).stdout
        m = re.search(rb"\x00depends=([^\x00]*)\x00", data)
        return [d for d in m.group(1).decode().split(",") if d] if m else []

    def visit(name):
        name = norm(name)
        if name in builtin:
            return
        path = index.get(name)
        if path is None:
            sys.exit(f"module {name} not found in {moddir}")
        for dep in depends(path):
            visit(dep)
        if path not in order:
            order.append(path)

    for module in modules:
        visit(module)
    return order


def build_binaries(cargo_args, target):
    """Builds vmard and vmarctl in release mode, and the artifact named `target` that
    `cargo build --release <cargo_args>` makes (a test or a devtools program). Returns its path
    first, then vmard and vmarctl."""
    log(f"building vmard, vmarctl and {target} (release)")
    run(["cargo", "build", "--release", "--locked", "--bins"], cwd=ROOT)
    out = run(["cargo", *cargo_args, "--release", "--locked", "--message-format=json"],
              cwd=ROOT, capture_output=True, text=True).stdout
    for line in out.splitlines():
        msg = json.loads(line)
        if msg.get("reason") == "compiler-artifact" and msg.get("executable") and \
                msg["target"]["name"] == target:
            return [Path(msg["executable"]), ROOT / "target/release/vmard",
                    ROOT / "target/release/vmarctl"]
    sys.exit(f"cargo did not report the executable {target}")


def libraries(binary):
    out = run(["ldd", str(binary)], capture_output=True, text=True).stdout
    libs = []
    for line in out.splitlines():
        m = re.search(r"(/\S+)", line.split("=>")[-1])
        if m and Path(m.group(1)).exists():
            libs.append(Path(m.group(1)))
    return libs




# udev rules the guest needs: default device permissions, and dmsetup's dm rules (node
# names, udev cookie completion).
UDEV_RULES = ["50-udev-default.rules", "55-dm.rules", "60-persistent-storage-dm.rules",
              "95-dm-notify.rules"]


# The start of every guest's /init: file systems, the modules (in dependency order), udev.
INIT_START = """#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mkdir -p /tmp /run /dev/mapper
mount -t tmpfs -o size=80% tmp /tmp
mount -t tmpfs run /run
for m in {modules}; do insmod /modules/$m || echo "insmod $m failed"; done
/lib/systemd/systemd-udevd --daemon --resolve-names=never
udevadm trigger --action=add
udevadm settle
"""


def build_initramfs(work, moddir, udev, modules, binaries, init, files=None):
    """Packs work/initramfs.cpio: busybox, `modules`, udev, dmsetup, `binaries` in /vmar/bin
    with their libraries, `files` (guest path -> host path), and an /init that loads the
    modules, starts udev and goes on with the shell script `init`."""
    tree = work / "initramfs"
    shutil.rmtree(tree, ignore_errors=True)
    for d in ["bin", "proc", "sys", "dev", "tmp", "run", "modules", "etc"]:
        (tree / d).mkdir(parents=True)
    shutil.copy2("/bin/busybox", tree / "bin/busybox")
    names = []
    for path in module_files(moddir, modules):
        src = moddir / path
        name = Path(path).name
        if name.endswith(".xz"):
            with open(tree / "modules" / name[:-3], "wb") as out:
                run(["xz", "-dkc", str(src)], stdout=out)
            name = name[:-3]
        elif name.endswith(".zst"):
            with open(tree / "modules" / name[:-4], "wb") as out:
                run(["zstd", "-dqc", str(src)], stdout=out)
            name = name[:-4]
        else:
            shutil.copy2(src, tree / "modules" / name)
        names.append(name)
    # udev: the multi-call udevadm is also systemd-udevd; rules from the udev package and
    # from the host's dmsetup package (installed with libdevmapper-dev).
    shutil.copy2(udev / "bin/udevadm", tree / "bin/udevadm")
    (tree / "lib/systemd").mkdir(parents=True)
    os.symlink("/bin/udevadm", tree / "lib/systemd/systemd-udevd")
    rules = tree / "lib/udev/rules.d"
    rules.mkdir(parents=True)
    for rule in UDEV_RULES:
        for source in [udev / "lib/udev/rules.d" / rule, Path("/lib/udev/rules.d") / rule]:
            if source.exists():
                shutil.copy2(source, rules / rule)
                break
        else:
            sys.exit(f"udev rule {rule} not found (install dmsetup)")
    for extra in (ROOT / "udev").glob("*.rules"):
        shutil.copy2(extra, rules / extra.name)
    # The rules' helpers (RUN+="vmar-devnode ..." is looked up in /lib/udev).
    for helper in (ROOT / "udev").glob("vmar-*"):
        shutil.copy2(helper, tree / "lib/udev" / helper.name)
    dmsetup = Path("/sbin/dmsetup").resolve()
    (tree / "sbin").mkdir(exist_ok=True)
    shutil.copy2(dmsetup, tree / "sbin/dmsetup")
    # util-linux's flock, which vmar-devnode takes (busybox has none).
    flock = Path("/usr/bin/flock").resolve()
    (tree / "usr/bin").mkdir(parents=True, exist_ok=True)
    shutil.copy2(flock, tree / "usr/bin/flock")
    wanted = set()
    for binary in [*binaries, udev / "bin/udevadm", dmsetup, flock]:
        wanted.add(binary)
        wanted.update(libraries(binary))
    # The binaries go to /vmar/bin: the guest mounts a tmpfs over /tmp, where a checkout may be.
    (tree / "vmar/bin").mkdir(parents=True)
    for binary in binaries:
        shutil.copy2(binary, tree / "vmar/bin" / binary.name)
    for path in wanted:
        if str(path).startswith(str(udev)) or path in binaries:
            continue
        dest = tree / str(path).lstrip("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, dest)
    # The dynamic loader is also reached through /lib64 on amd64.
    for loader in glob.glob("/lib64/ld-linux-x86-64.so.2"):
        dest = tree / loader.lstrip("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(os.path.realpath(loader), dest)
    (tree / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534::/:/bin/sh\n")
    (tree / "etc/group").write_text("root:x:0:\ndisk:x:6:\nnogroup:x:65534:\n")
    for dest, source in (files or {}).items():
        target = tree / dest.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)
    init = INIT_START.replace("{modules}", " ".join(names)) + init
    (tree / "init").write_text(init)
    (tree / "init").chmod(0o755)
    image = work / "initramfs.cpio"
    with open(image, "wb") as out:
        files = run(["find", "."], cwd=tree, capture_output=True).stdout
        run(["cpio", "--quiet", "-o", "-H", "newc"], cwd=tree, input=files, stdout=out)
    return image


def kvm_works():
    # Nested KVM hangs on some hosts (seen here); only trust it when asked.
    return os.environ.get("VMAR_KERNEL_TEST_KVM") == "1" and os.access("/dev/kvm", os.W_OK)


def boot(vmlinuz, initramfs, timeout, memory, extra=()):
    """Boots the guest; returns its console output and the wall time."""
    accel = ["-enable-kvm", "-cpu", "host"] if kvm_works() else ["-accel", "tcg", "-cpu", "max"]
    cmd = ["qemu-system-x86_64", *accel, "-m", str(memory), "-smp", "2", "-nographic",
           "-no-reboot", "-kernel", str(vmlinuz), "-initrd", str(initramfs), *extra,
           "-append", "console=ttyS0 panic=-1 quiet loglevel=3"]
    log(f"booting: {' '.join(cmd)}")
    started = time.monotonic()
    try:
        # The guest's output is the result, whatever QEMU's exit status.
        proc = subprocess.run(cmd, capture_output=True, timeout=timeout, check=False)
        output = proc.stdout.decode(errors="replace")
    except subprocess.TimeoutExpired as e:
        output = (e.stdout or b"").decode(errors="replace")
        output += f"\nGUEST: timed out after {timeout} s\n"
    return output, time.monotonic() - started


def finish(work, output, seconds, tag, shown):
    """Ends a guest suite: keeps the guest's console in work/guest.log, prints the lines
    `shown` selects and the suite's `TAG: N passed, N failed` count, and exits non-zero
    unless some tests passed and none failed."""
    (work / "guest.log").write_text(output)
    for line in output.splitlines():
        line = line.rstrip("\r")
        if shown(line):
            print(line)
    print(f"{tag}: guest ran {seconds:.1f} s wall time (log: {work / 'guest.log'})")
    counts = re.findall(rf"{tag}: (\d+) passed, (\d+) failed", output)
    if not counts:
        sys.exit(f"{tag.lower()}: no result from the guest")
    passed, failed = map(int, counts[-1])
    print(f"{passed} passed, {failed} failed")
    sys.exit(0 if failed == 0 and passed > 0 else 1)
