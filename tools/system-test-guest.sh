#!/bin/bash
# Checks pass commands to `bash -c` in single quotes on purpose (expanded there, not here).
# shellcheck disable=SC2016
# Guest side of tools/system-test.py, run by systemd (vmar-system-test.service) after
# multi-user.target on each boot of a Debian 12 guest; /var/lib/vmar is a persistent disk
# holding this script, the package and the images (staged outside the default image root,
# which the package must create, and moved in after the install). Boot 1 installs the package and checks
# the service, the devices and what the host sees of their content, then reboots; boot 2
# checks that systemd restored the devices before libvirt, starts a libvirt domain on a vmar
# device, removes the package and powers off. Results go to the serial console as
# "SYSTEM-TEST: ok NAME" / "SYSTEM-TEST: FAIL NAME"; details to $T/log.
set -u
T=/var/lib/vmar/system-test
IMAGES=/var/lib/vmar/images
# Where tools/system-test.py puts the images: the package creates $IMAGES, they go there after.
STAGED=/var/lib/vmar/staged-images
LOG=$T/log
PATH=/usr/sbin:/usr/bin:/sbin:/bin
exec 2>&1

say() { echo "SYSTEM-TEST: $*"; echo "=== $*" >>"$LOG"; }
ok() { say "ok $*"; }
fail() { say "FAIL $*"; }
# check NAME COMMAND...: ok when COMMAND succeeds; its output goes to the log, and the last
# lines of it to the console too when it fails (what CI shows).
check() {
    local name=$1 out
    shift
    echo "--- $name: $*" >>"$LOG"
    out=$(mktemp)
    if "$@" >"$out" 2>&1; then
        cat "$out" >>"$LOG"
        ok "$name"
    else
        cat "$out" >>"$LOG"
        fail "$name"
        tail -n 8 "$out" | cut -c1-300 | sed 's/^/SYSTEM-TEST:     /'
    fi
    rm -f "$out"
}
# Monotonic microseconds of a unit's property (0 when it never happened).
mono() { systemctl show -P "$2" "$1"; }

# libvirt hook, pool and Nova checks (tools/system-test-platform.sh).
# shellcheck source=tools/system-test-platform.sh
. "$T/platform.sh"
# Operations checks (monitoring, watchdog, reload, restore check): ops_boot1, ops_boot2.
# shellcheck source=tools/system-test-ops.sh
. "$T/ops.sh"

phase=$(cat "$T/phase" 2>/dev/null || echo 1)
say "boot $phase: $(uname -r), $(systemctl --version | head -n1), up $(cut -d' ' -f1 /proc/uptime) s"

# What the host sees of guest content: LVM, file-system labels and UUIDs, activated dm
# devices. Each image's content must stay invisible while its vmar device is live.
HIDDEN="lvmpart lvmwhole fswhole"
devices_exist() {
    local d
    for d in $HIDDEN; do
        if ! test -b "/dev/mapper/vmar-$d" || ! test -b "/dev/vmar/$d"; then
            echo "vmar-$d or /dev/vmar/$d missing"
            return 1
        fi
    done
}
# none_of PATTERN OUTPUT: OUTPUT (logged) has no line matching PATTERN.
none_of() {
    echo "$2"
    ! grep -E "$1" <<<"$2"
}
# LVM's commands read every block device's label themselves, whatever udev says, so a PV
# that fills an image is listed by pvs unless LVM is told which devices are the host's: its
# devices file (/etc/lvm/devices/system.devices; this host has no PV of its own, so it is
# empty). Debian 12 leaves use_devicesfile off; README says to turn it on.
LVM_DEVICES_FILE=(--config "devices/use_devicesfile=1")
no_guest_lvm() {
    none_of "guestvg|wholevg" "$(pvs "${LVM_DEVICES_FILE[@]}" --noheadings -o pv_name,vg_name 2>&1
        vgs "${LVM_DEVICES_FILE[@]}" --noheadings 2>&1; lvs "${LVM_DEVICES_FILE[@]}" --noheadings 2>&1)"
}
no_guest_lv_active() { none_of "^(guestvg|wholevg)-" "$(dmsetup ls 2>&1)"; }
no_guest_labels() { none_of "^(guestdata|guestboot|wholedata|wholefs)$" "$(ls /dev/disk/by-label/ 2>&1)"; }
no_uuid_links() {
    local d t l
    for d in $HIDDEN; do
        t=$(readlink -f "/dev/mapper/vmar-$d")
        for l in /dev/disk/by-uuid/*; do
            [ -e "$l" ] || continue
            [ "$(readlink -f "$l")" = "$t" ] && { echo "$l -> $t"; return 1; }
        done
    done
    return 0
}
no_blkid() {
    local d
    for d in $HIDDEN; do
        none_of "^ID_FS_|^ID_PART_TABLE" "$(udevadm info -q property "/dev/mapper/vmar-$d" 2>&1)" || return 1
    done
}
hidden_checks() {
    local when=$1
    udevadm settle
    check "$when: vmar devices exist (/dev/mapper/vmar-*, /dev/vmar/*)" devices_exist
    say "note: without LVM's devices file, pvs lists: $(pvs --noheadings -o pv_name,vg_name 2>/dev/null | grep -E "guestvg|wholevg" | tr -s ' ' | tr '\n' ';')"
    check "$when: pvs/vgs/lvs show no guest volume group (LVM devices file on)" no_guest_lvm
    check "$when: no guest LV activated (dmsetup ls)" no_guest_lv_active
    check "$when: no /dev/disk/by-label links to guest file systems" no_guest_labels
    check "$when: no /dev/disk/by-uuid links to vmar devices" no_uuid_links
    check "$when: blkid was not run on vmar devices (no ID_FS_* in udev)" no_blkid
}

# Images whose content a host must not pick up: a partitioned disk whose first partition is
# an LVM PV (VG guestvg, LV data with ext4 "guestdata") and second an ext4 "guestboot"; a
# whole-disk PV (VG wholevg, ext4 "wholedata"); a whole-disk ext4 "wholefs". Built here with
# loop devices, then deactivated and detached, so the host has no trace of them before vmar.
make_hidden_images() {
    local dev
    truncate -s 64M "$STAGED/lvmpart.raw"
    printf 'label: dos\n,40M,8e\n,,83\n' | sfdisk -q "$STAGED/lvmpart.raw"
    dev=$(losetup --show -f -P "$STAGED/lvmpart.raw")
    udevadm settle
    pvcreate -q "${dev}p1" && vgcreate -q guestvg "${dev}p1" &&
        lvcreate -q -y -L 16M -n data guestvg && udevadm settle &&
        mkfs.ext4 -q -L guestdata /dev/guestvg/data && mkfs.ext4 -q -L guestboot "${dev}p2" &&
        vgchange -q -an guestvg || return 1
    losetup -d "$dev"
    truncate -s 32M "$STAGED/lvmwhole.raw"
    dev=$(losetup --show -f "$STAGED/lvmwhole.raw")
    udevadm settle
    pvcreate -q "$dev" && vgcreate -q wholevg "$dev" && lvcreate -q -y -L 8M -n data wholevg &&
        udevadm settle && mkfs.ext4 -q -L wholedata /dev/wholevg/data &&
        vgchange -q -an wholevg || return 1
    losetup -d "$dev"
    truncate -s 16M "$STAGED/fswhole.raw"
    mkfs.ext4 -q -L wholefs "$STAGED/fswhole.raw" || return 1
    udevadm settle
    pvscan --cache >/dev/null 2>&1
    # Before vmar: the host sees none of it.
    ! pvs --noheadings 2>/dev/null | grep -E "guestvg|wholevg"
}

# The dm table of a device, or "" when it does not exist, with each loop device (7:N) replaced
# by its backing file's inode: loop numbers may change across a reboot, the files may not.
# (Not by the backing file's path: a loop device attached in vmard's mount namespace shows a
# path relative to the data disk once that namespace is gone, e.g. after a restart.)
table() {
    local line word out=""
    while read -r line; do
        for word in $line; do
            if [[ $word =~ ^7:([0-9]+)$ ]]; then
                word="inode:$(losetup -n -O BACK-INO "/dev/loop${BASH_REMATCH[1]}" 2>/dev/null || echo "$word")"
            fi
            out+="$word "
        done
        out+=$'\n'
    done < <(dmsetup table "vmar-$1" 2>/dev/null)
    printf '%s' "$out"
}
# same_table NAME TABLE: device NAME is live with TABLE (not empty).
same_table() {
    local now
    now=$(table "$1")
    echo "vmar-$1: ${now:-no such device}"
    [ -n "$2" ] && [ "$now" = "$2" ]
}
# Exactly one loop device reads file $1 (by inode; paths can be stale, see table()).
one_loop_over() {
    local ino
    ino=$(stat -c %i "$1")
    losetup -l -n -O NAME,BACK-INO,BACK-FILE | awk -v i="$ino" '$2 == i' | tee -a "$LOG" | wc -l | grep -qx 1
}
# vmard's messages in the journal carry no timestamp of their own (journald has one).
no_second_timestamp() {
    local lines
    lines=$(journalctl -b -u vmard -o cat --no-pager | grep -v -E "^(Starting|Started|Stopping|Stopped|Reloading|Reloaded) ")
    [ -n "$lines" ] && none_of "^[[:space:]]*(.\[[0-9;]*m)?[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9:.]+Z?" "$lines"
}
# What vmard logged between systemd's "Stopping" and "Stopped" of its last stop.
# What vmard logged since its last start (journald may file vmard's last lines before
# systemd's "Stopping" line, so that line cannot mark where the stop begins).
logged_at_stop() {
    journalctl -b -u vmard -o cat --no-pager | awk '/^Starting vmard/ { buf = "" } { buf = buf $0 "\n" } END { printf "%s", buf }' |
        grep -v -E "^(Starting|Started|Stopping|Stopped) "
}
# journald reads the service's stderr asynchronously: give the last lines a moment.
stop_logged() {
    local _
    for _ in 1 2 3 4 5 6 7 8 9 10; do
        logged_at_stop | grep -i -E "catalog|shut|signal|exit" && return 0
        journalctl --sync 2>/dev/null || sleep 1
        sleep 0.5
    done
    journalctl -b -u vmard -o cat --no-pager | tail -n 20
    return 1
}
# systemd-analyze verify, less its complaints about man pages (no man-db in the guest).
verify_unit() {
    local out
    out=$(systemd-analyze verify vmard.service 2>&1)
    echo "$out"
    ! grep -v -E "man (vmard|vmarctl|vmar\.toml)\([158]\)" <<<"$out" | grep -q .
}

# Issue 18.1: a write to a served image from a shell is refused by the kernel (vmard answers
# fanotify permission events under the shipped unit), logged with the process and the
# devices; the device keeps serving the captured bytes and stays active.
guarded_writes() {
    local since
    since=$(date '+%Y-%m-%d %H:%M:%S')
    sleep 1
    check "a write to a served image from a shell is refused" \
        bash -c "! dd if=/dev/zero of=$IMAGES/tiny.raw bs=4096 count=1 conv=notrunc"
    check "the refused write left tiny.raw as captured: /dev/vmar/tiny still equals it" \
        cmp /dev/vmar/tiny "$IMAGES/tiny.raw"
    check "journal: the refusal names the process and the device" \
        bash -c "journalctl -u vmard --since '$since' --no-pager | grep -E 'refused an open .*of image tiny ' | grep 'pid [0-9]'"
    check "tiny is still active" bash -c "vmarctl --json status tiny | grep '\"state\": *\"active\"'"
}

# OpenStack Nova's pattern on the compute node that nova_checks (platform.sh) set up:
# /var/lib/nova/instances/_base is an image root with auto-capture, a base image appears
# there and is captured, instance qcow2 overlays are backed by /dev/vmar/HASH instead of the
# _base file, then Nova's image cache manager deletes the _base file (no instance disk
# names it any more). Under the shipped unit _base is another mount than /var/lib/vmar, so
# vmar holds the file beside itself (_base/.vmar-holds): the instance disks read the image's
# bytes before and after the reboot.
NOVA_GONE=$(printf 'glance-image-deleted' | sha1sum | cut -c1-40)
nova_gone=$NOVA_BASE/$NOVA_GONE
nova_disk_sum() { qemu-img convert -f qcow2 -O raw "$T/instances/$1.qcow2" "$T/instances/$1.raw" && sha256sum <"$T/instances/$1.raw" | cut -d' ' -f1; rm -f "$T/instances/$1.raw"; }
nova_disks_read_the_image() {
    local vm
    for vm in vm1 vm2; do
        [ "$(nova_disk_sum "$vm")" = "$(cat "$T/nova.sha256")" ] || return 1
    done
}
nova_shown_gone_and_held() {
    vmarctl images >>"$LOG" 2>&1
    vmarctl --json images | jq -e --arg n "$NOVA_GONE" --arg h "$NOVA_BASE/.vmar-holds/" \
        '.images[] | select(.name == $n) | .file.state == "gone"
         and (.file.hold | startswith($h))
         and (.file.kept_by.devices | index($n)) != null' >/dev/null &&
        vmarctl images -o name,file | grep -q "^$NOVA_GONE  *gone (held)"
}
nova_boot1() {
    mkdir -p "$T/instances"
    # Own blocks (random) and blocks shared with tiny: both must outlive the file. Nova
    # downloads to a temporary name and renames it into place.
    { head -c $((4 * 1024 * 1024)) /dev/urandom; cat "$IMAGES/tiny.raw"; } >"$nova_gone.part"
    mv "$nova_gone.part" "$nova_gone"
    sha256sum <"$nova_gone" | cut -d' ' -f1 >"$T/nova.sha256"
    check "nova: auto-capture took _base/$NOVA_GONE" \
        wait_until 60 bash -c "vmarctl --json images | jq -e '.images[] | select(.name == \"$NOVA_GONE\")'"
    check "nova: _base/$NOVA_GONE is held beside itself (another mount than /var/lib/vmar)" \
        bash -c "vmarctl --json images | jq -e --arg n '$NOVA_GONE' --arg h '$NOVA_BASE/.vmar-holds/' \
            '.images[] | select(.name == \$n) | .file.hold | startswith(\$h)'"
    check "nova: vmarctl ensure $NOVA_GONE" vmarctl ensure "$NOVA_GONE"
    local vm
    for vm in vm1 vm2; do
        check "nova: qemu-img create instance $vm's overlay backed by /dev/vmar/$NOVA_GONE" \
            qemu-img create -f qcow2 -b "/dev/vmar/$NOVA_GONE" -F raw "$T/instances/$vm.qcow2"
    done
    check "nova: the instance disks read the image's bytes" nova_disks_read_the_image
    check "nova: the image cache manager deletes _base/$NOVA_GONE" rm "$nova_gone"
    check "nova: after the deletion the instance disks still read the image's bytes" \
        nova_disks_read_the_image
    check "nova: vmarctl images shows _base/$NOVA_GONE gone, held, kept by its device" \
        nova_shown_gone_and_held
}
nova_boot2() {
    check "nova after reboot: /dev/vmar/$NOVA_GONE restored (from vmar's hold)" \
        test "$(vmarctl --json status "$NOVA_GONE" | jq -r .state)" = active
    check "nova after reboot: its loop device reads vmar's hold in _base/.vmar-holds" \
        bash -c "grep . /sys/block/loop*/loop/backing_file; grep -l '/_base/\.vmar-holds/' /sys/block/loop*/loop/backing_file"
    check "nova after reboot: the instance disks read the image's bytes (deleted before the reboot)" \
        nova_disks_read_the_image
    check "nova after reboot: vmarctl images shows it gone, held, kept by its device" \
        nova_shown_gone_and_held
}

# A fresh install: the package makes the default image root (vmar.toml names it), and vmard
# started at once, without restarting; then the staged images move in.
fresh_install_checks() {
    check "fresh install: the package made $IMAGES" test -d "$IMAGES"
    check "fresh install: vmard active without a restart" \
        bash -c 'systemctl is-active vmard && n=$(systemctl show -P NRestarts vmard) && echo "NRestarts=$n" && [ "$n" = 0 ]'
    check "fresh install: vmarctl check is OK (exit 0)" vmarctl check
    check "move the staged images into $IMAGES" bash -c "mv $STAGED/* $IMAGES/ && rmdir $STAGED"
}

# Boot 2 starts with the image root /srv/images2 missing (an NFS share not mounted yet): its
# device "far" must wait while the others are restored, and come back when it appears.
missing_root_prepare() {
    check "create far from /srv/images2/reload.raw" vmarctl create far reload
    check "vmarctl check is OK before the reboot" vmarctl check
    mv /srv/images2 /srv/images2.away
}

missing_root_checks() {
    local out code
    check "missing root: tiny restored although /srv/images2 is missing" \
        same_table tiny "$(cat "$T/tiny.table")"
    check "missing root: far waits (state missing)" \
        bash -c '[ "$(vmarctl --json list | jq -r ".devices[] | select(.name == \"far\") | .state")" = missing ]'
    check "missing root: vmarctl ping names the root" \
        bash -c 'vmarctl ping | tee /dev/stderr | grep -q "image root /srv/images2 cannot be used"'
    check "missing root: the unit's status text says so" \
        bash -c 'systemctl show -P StatusText vmard | tee /dev/stderr | grep -q "1 image roots missing"'
    out=$(vmarctl check)
    code=$?
    echo "$out" >>"$LOG"
    check "missing root: vmarctl check exits 2 (CRITICAL), got $code" test "$code" = 2
    check "missing root: vmarctl check names device far and the root" \
        bash -c 'grep -q "^CRITICAL: device far: " <<<"$1" && grep -q "^WARNING: image root /srv/images2: " <<<"$1"' _ "$out"
    mv /srv/images2.away /srv/images2
    check "missing root: far restored once the root appears" \
        bash -c 'for _ in $(seq 60); do [ "$(vmarctl --json list | jq -r ".devices[] | select(.name == \"far\") | .state")" = active ] && exit 0; sleep 1; done; exit 1'
    check "missing root: /dev/vmar/far reads back equal to reload.raw" cmp /dev/vmar/far /srv/images2/reload.raw
}

boot1() {
    check "PID 1 is systemd" test "$(cat /proc/1/comm)" = systemd
    check "images with LVM and labelled file systems (made on loop devices, then detached)" \
        make_hidden_images
    mkdir -p /etc/lvm/devices
    : >/etc/lvm/devices/system.devices
    check "fresh install: no $IMAGES before dpkg -i" test ! -e "$IMAGES"
    check "dpkg -i vmar.deb" dpkg -i "$T/vmar.deb"
    check "the package enabled and started vmard" \
        bash -c 'systemctl is-enabled vmard && systemctl is-active vmard'
    fresh_install_checks
    check "systemctl enable --now vmard" systemctl enable --now vmard
    check "dpkg -L lists the binaries, the unit and the udev rule" \
        bash -c 'dpkg -L vmar | grep -x -e /usr/bin/vmard -e /usr/bin/vmarctl -e /lib/systemd/system/vmard.service -e /lib/udev/rules.d/61-vmar.rules | wc -l | grep -x 4'
    check "/etc/vmar/vmar.toml is a conffile" \
        bash -c 'dpkg-query -W -f="\${Conffiles}" vmar | grep -q /etc/vmar/vmar.toml'
    check "the unit wants modprobe@loop and modprobe@dm_mod" \
        bash -c 'systemctl show -P Wants vmard | tr " " "\n" | grep -x -e modprobe@loop.service -e modprobe@dm_mod.service | wc -l | grep -x 2'
    check "the unit is ordered after remote-fs.target, before libvirtd, virtqemud, libvirt-guests" \
        bash -c 'a=$(systemctl show -P After vmard); b=$(systemctl show -P Before vmard); echo "$a / $b"; [[ " $a " == *" remote-fs.target "* ]] && for u in libvirtd.service virtqemud.service libvirt-guests.service; do [[ " $b " == *" $u "* ]] || exit 1; done'
    say "systemd-analyze security vmard.service:"
    systemd-analyze security --no-pager vmard.service | sed 's/^/    /'
    exposure=$(systemd-analyze security --no-pager vmard.service | sed -n 's/.*Overall exposure level for vmard.service: \([0-9.]*\).*/\1/p')
    check "exposure $exposure is at most 2.0" awk -v e="$exposure" 'BEGIN { exit !(e != "" && e <= 2.0) }'
    check "systemd-analyze verify vmard.service" verify_unit

    # Devices through the running service.
    check "capture tinybase tiny lvmpart lvmwhole fswhole" \
        vmarctl capture "$IMAGES/tinybase.raw" "$IMAGES/tiny.raw" "$IMAGES/lvmpart.raw" \
        "$IMAGES/lvmwhole.raw" "$IMAGES/fswhole.raw"
    for name in tiny lvmpart lvmwhole fswhole; do
        check "create $name" vmarctl create "$name" "$name"
    done
    check "/dev/vmar/tiny and /dev/mapper/vmar-tiny exist" \
        test -b /dev/vmar/tiny -a -b /dev/mapper/vmar-tiny
    check "/dev/vmar/tiny reads back equal to tiny.raw" cmp /dev/vmar/tiny "$IMAGES/tiny.raw"
    check "/dev/vmar/tiny is a block node of its own (not a symlink), root:disk 0640, the device's number" \
        bash -c '! test -L /dev/vmar/tiny && [ "$(stat -c "%t:%T %U:%G %a" /dev/vmar/tiny)" = "$(stat -L -c "%t:%T" /dev/mapper/vmar-tiny) root:disk 640" ]'
    check "the package let virt-aa-helper read /dev/vmar (one line in its local include, profile loaded)" \
        bash -c '/usr/lib/vmar/vmar-apparmor status && grep -c "abstractions/vmar-virt-aa-helper" /etc/apparmor.d/local/usr.lib.libvirt.virt-aa-helper | grep -x 1 && aa-status | grep -q virt-aa-helper'
    hidden_checks "after create"
    check "journal: vmard logs without a second timestamp" no_second_timestamp

    # Restart and stop while a device is open: the devices stay as they are.
    local before
    before=$(table tiny)
    # A process that only keeps the device open.
    # shellcheck disable=SC2217
    sleep 600 </dev/vmar/tiny &
    local holder=$!
    check "systemctl restart vmard while /dev/vmar/tiny is open" systemctl restart vmard
    check "restart: vmard active again" systemctl is-active vmard
    check "restart: tiny still live, same table" same_table tiny "$before"
    check "restart: /dev/vmar/tiny still there" test -b /dev/vmar/tiny
    check "create tinybase after the restart" vmarctl create tinybase tinybase
    check "one loop device per image file: tinybase's is reused after the restart" \
        one_loop_over "$IMAGES/tinybase.raw"
    check "systemctl stop vmard while /dev/vmar/tiny is open" systemctl stop vmard
    check "stop: SIGTERM ended vmard cleanly (Result=success, status 0)" \
        bash -c 'r=$(systemctl show -P Result vmard); s=$(systemctl show -P ExecMainStatus vmard); echo "Result=$r status=$s"; [ "$r" = success ] && [ "$s" = 0 ]'
    check "stop: every device still live, tiny with the same table" \
        bash -c "dmsetup info vmar-lvmpart && dmsetup info vmar-lvmwhole && dmsetup info vmar-fswhole"
    check "stop: tiny still live, same table" same_table tiny "$before"
    check "stop: vmard logged that it closed the catalog" \
        stop_logged
    kill "$holder" 2>/dev/null
    check "systemctl start vmard" systemctl start vmard

    # SIGHUP (ExecReload) re-reads /etc/vmar/vmar.toml: a new image root becomes usable.
    mkdir -p /srv/images2
    cp "$IMAGES/tinybase.raw" /srv/images2/reload.raw
    check "before reload: /srv/images2 is not an image root" \
        bash -c '! vmarctl capture /srv/images2/reload.raw'
    cp /etc/vmar/vmar.toml "$T/vmar.toml.orig"
    sed -i 's|^image_roots = .*|image_roots = ["/var/lib/vmar/images", "/srv/images2"]|' /etc/vmar/vmar.toml
    local pid
    pid=$(systemctl show -P MainPID vmard)
    check "systemctl reload vmard" systemctl reload vmard
    sleep 2
    check "reload: same process" test "$(systemctl show -P MainPID vmard)" = "$pid"
    check "reload: the new image root is used (capture /srv/images2/reload.raw)" \
        vmarctl capture /srv/images2/reload.raw
    ops_boot1

    guarded_writes
    nova_checks

    nova_boot1

    missing_root_prepare

    # What the next boot compares with.
    table tiny >"$T/tiny.table"
    table lvmpart >"$T/lvmpart.table"
    echo 2 >"$T/phase"
    sync
    say "rebooting"
    systemctl reboot
}

# The tiny VM: libvirt (Debian's default AppArmor security driver) starts a domain whose disk
# is a qcow2 overlay over /dev/vmar/tiny, exactly as `vmarctl libvirt-xml` prints it. It boots
# from that disk (tools/system-test-boot.asm), reads all of it and prints a checksum.
domain_checks() {
    if [ -e "$T/quick" ]; then
        say "inner VM skipped (--quick)"
        return
    fi
    check "libvirt's QEMU driver uses AppArmor" \
        bash -c 'aa-enabled && virsh capabilities | grep -A1 "<secmodel>" | grep "<model>apparmor</model>"'
    local overlay=/var/lib/libvirt/images/vmar-tiny.qcow2
    rm -f "$overlay" /var/log/libvirt/qemu/vmar-tiny.serial
    check "qemu-img create the overlay over /dev/vmar/tiny" \
        qemu-img create -q -f qcow2 -b /dev/vmar/tiny -F raw "$overlay"
    vmarctl libvirt-xml tiny --overlay "$overlay" >"$T/disk.xml"
    awk -v disk="$T/disk.xml" '/@DISK@/ { while ((getline l < disk) > 0) print "    " l; next } { print }' \
        "$T/domain.xml" >"$T/vmar-tiny.xml"
    cat "$T/vmar-tiny.xml" >>"$LOG"
    local before redirected own
    before=$(vmarctl --json stats tiny | jq '.devices[0].read.total')
    redirected=$(vmarctl --json stats tiny | jq '.devices[0].read.by_class.redirected')
    own=$(vmarctl --json stats tiny | jq '.devices[0].read.by_class.own')
    check "virsh define the domain with vmarctl's <disk>" virsh define "$T/vmar-tiny.xml"
    local started
    started=$(date +%s)
    check "virsh start vmar-tiny" virsh start vmar-tiny
    say "AppArmor rules virt-aa-helper made for the disks: $(grep -h -E "dm-|vmar" /etc/apparmor.d/libvirt/libvirt-*.files 2>/dev/null | tr -s ' ' | tr '\n' ';')"
    local serial=/var/log/libvirt/qemu/vmar-tiny.serial
    for _ in $(seq 900); do
        [ "$(virsh domstate vmar-tiny 2>/dev/null)" = running ] || break
        grep -a -q "INNER-VM: done" "$serial" 2>/dev/null && break
        sleep 1
    done
    say "the VM ran $(($(date +%s) - started)) s"
    virsh destroy vmar-tiny >>"$LOG" 2>&1
    grep -a "INNER-VM" "$serial" 2>/dev/null | tr -d '\r' | sed 's/^/    /'
    local want got
    want=$(cat "$T/tiny.sum")
    got=$(grep -a -o "INNER-VM: sum [0-9a-f]*" "$serial" 2>/dev/null | cut -d' ' -f3)
    check "the VM read its whole disk: checksum $got equals tiny.raw's $want" test "$got" = "$want"
    check "no AppArmor denial for the domain" \
        bash -c '! journalctl -k -b --no-pager | grep -a "apparmor=\"DENIED\"" | grep -a libvirt'
    local after
    after=$(vmarctl --json stats tiny | jq '.devices[0].read.total')
    vmarctl stats tiny | sed 's/^/    /'
    check "vmarctl stats shows the VM's reads ($before -> $after bytes, image 16 MiB)" \
        test "$((after - before))" -ge $((16 * 1024 * 1024))
    # tiny's first half redirects to tinybase, its second half is its own: 8 MiB each.
    local redirected_after own_after
    redirected_after=$(vmarctl --json stats tiny | jq '.devices[0].read.by_class.redirected')
    own_after=$(vmarctl --json stats tiny | jq '.devices[0].read.by_class.own')
    check "vmarctl stats: at least 8 MiB of the VM's reads redirected ($redirected -> $redirected_after bytes)" \
        test "$((redirected_after - redirected))" -ge $((8 * 1024 * 1024))
    check "vmarctl stats: at least 8 MiB of the VM's reads from tiny's own blocks ($own -> $own_after bytes)" \
        test "$((own_after - own))" -ge $((8 * 1024 * 1024))
    check "vmarctl stats lists the image files tiny reads and their cached bytes" \
        bash -c '[ "$(vmarctl --json stats tiny | jq "[.images[] | select(.cached > 0)] | length")" -ge 2 ]'
    virsh undefine vmar-tiny >>"$LOG" 2>&1
}

boot2() {
    check "after reboot: vmard active" systemctl is-active vmard
    check "after reboot: tiny restored with the same table" same_table tiny "$(cat "$T/tiny.table")"
    check "after reboot: lvmpart restored with the same table" \
        same_table lvmpart "$(cat "$T/lvmpart.table")"
    check "after reboot: /dev/vmar/tiny exists" test -b /dev/vmar/tiny
    # Type=notify: READY=1 comes after the restore, and libvirt's units start after that.
    local ready
    ready=$(mono vmard ActiveEnterTimestampMonotonic)
    for unit in libvirtd.service libvirt-guests.service; do
        local start
        start=$(mono "$unit" ExecMainStartTimestampMonotonic)
        [ "$start" = 0 ] && start=$(mono "$unit" ActiveEnterTimestampMonotonic)
        if [ "$start" = 0 ]; then
            say "$unit did not start at boot"
            continue
        fi
        check "after reboot: vmard was ready (${ready} us) before $unit started (${start} us)" \
            test "$ready" -gt 0 -a "$ready" -lt "$start"
    done
    hidden_checks "after reboot"
    # far's root comes back first: the ops checks restart vmard and want every device served
    # but doomed, which they remove.
    missing_root_checks
    ops_boot2
    nova_boot2
    check "after reboot: vmarctl check is OK once far's root is back and doomed removed" vmarctl check

    domain_checks
    hook_checks

    # Removing the package stops the service and leaves live devices alone.
    check "dpkg -r vmar" dpkg -r vmar
    check "after dpkg -r: vmard is not running" bash -c '! systemctl is-active vmard'
    check "after dpkg -r: the devices are still live" \
        bash -c 'dmsetup info vmar-tiny && dmsetup info vmar-lvmpart && cmp /dev/mapper/vmar-tiny /var/lib/vmar/images/tiny.raw'
    check "after dpkg -r: the catalog is kept" test -e /var/lib/vmar/catalog.redb
    check "after dpkg -r: virt-aa-helper's local include no longer names vmar" \
        bash -c '! grep vmar /etc/apparmor.d/local/usr.lib.libvirt.virt-aa-helper'
    check "after dpkg -r: the live devices keep their /dev/vmar nodes" test -b /dev/vmar/tiny
    echo 3 >"$T/phase"
    say "finished"
    sync
    systemctl poweroff
}

case "$phase" in
    1) boot1 ;;
    2) boot2 ;;
    *) say "finished"; systemctl poweroff ;;
esac
