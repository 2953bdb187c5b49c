#!/usr/bin/env python3
"""Runs vmar's real-kernel tests (tests/kernel.rs) in a QEMU guest booting Debian's kernel.

The host kernel has no device-mapper, so this boots Debian's kernel (tools/guest.py) with an
initramfs holding dm-mod, dm-zero and loop, Debian's udev (the devicemapper crate refuses to
work without udev), the release binaries and the kernel test binary; its /init runs the tests
with --ignored and powers off. The result comes back on the serial console as
`KERNEL-TEST: N passed, M failed`; the exit status is 0 only when nothing failed.

    tools/kernel-test.py [--filter NAME] [--timeout SECONDS] [--memory MIB]
"""

import argparse
import os

import guest

WORK = guest.WORK

# What /init does once the guest is up (tools/guest.py: modules loaded, udev running).
INIT = """echo "KERNEL-TEST: booted $(uname -r) in $(cut -d' ' -f1 /proc/uptime) s"
cd /tmp
export TMPDIR=/tmp RUST_BACKTRACE=1 VMAR_TEST_LOG={log} VMAR_BIN_DIR=/vmar/bin
{test} --ignored --test-threads=1 --nocapture {filter} > /tmp/out.txt 2>&1
echo "KERNEL-TEST: exit $?"
cat /tmp/out.txt
passed=$(sed -n 's/^test result: .*\\. \\([0-9]*\\) passed; \\([0-9]*\\) failed.*/\\1/p' /tmp/out.txt)
failed=$(sed -n 's/^test result: .*\\. \\([0-9]*\\) passed; \\([0-9]*\\) failed.*/\\2/p' /tmp/out.txt)
echo "KERNEL-TEST: ${{passed:-0}} passed, ${{failed:-1}} failed"
sync
poweroff -f
"""


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--filter", help="run only tests whose name contains this")
    parser.add_argument("--timeout", type=int, default=900)
    parser.add_argument("--memory", type=int, default=2048, help="guest memory in MiB")
    args = parser.parse_args()

    guest.ensure_packages()
    vmlinuz, moddir = guest.fetch_kernel()
    udev = guest.fetch_udev()
    binaries = guest.build_binaries(["test", "--no-run", "--test", "kernel"], "kernel")
    init = INIT.format(test=f"/vmar/bin/{binaries[0].name}",
                       log=os.environ.get("VMAR_TEST_LOG", "error"), filter=args.filter or "")
    initramfs = guest.build_initramfs(WORK, moddir, udev, guest.MODULES, binaries, init)
    output, seconds = guest.boot(vmlinuz, initramfs, args.timeout, args.memory)
    guest.finish(WORK, output, seconds, "KERNEL-TEST",
                 lambda line: not line.startswith("[") or "KERNEL-TEST" in line or "GUEST:" in line)


if __name__ == "__main__":
    main()
