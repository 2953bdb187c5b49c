# shellcheck shell=bash disable=SC2016
# Guest checks of vmar on a libvirt host and a Nova compute node, sourced by
# tools/system-test-guest.sh (which defines check, say, ok, fail, $T, $IMAGES, $LOG).
# Boot 1: the Nova recipe (auto-capture of a _base directory laid out as Nova's, instance
# overlays rebased onto /dev/vmar/HASH and back). Boot 2: the libvirt hook (domains on devices
# that do not exist yet, two domains starting at once, a name re-pointed at other content)
# and the storage pool over /dev/vmar. The commands are the README's operator's guide.

NOVA=/var/lib/nova/instances
NOVA_BASE=$NOVA/_base
# Nova names a cached image by the SHA-1 of its Glance id.
NOVA_HASH=$(printf 'glance-image-tiny' | sha1sum | cut -c1-40)

# Images auto-capture has captured, one name a line.
captured_images() { vmarctl --json images | jq -r '.images[].name'; }
# wait_until SECONDS COMMAND...: polls COMMAND once a second.
wait_until() {
    local n=$1
    shift
    for _ in $(seq "$n"); do
        "$@" >/dev/null 2>&1 && return 0
        sleep 1
    done
    "$@"
}
# Auto-capture skipped FILE as one of Nova's own files.
skipped_as_nova() {
    vmarctl --json images | jq -e --arg p "$1" \
        '.auto_capture.skipped[] | select(.path == $p and .kind == "nova-file")'
}
# chain_is OVERLAY BACKING: qemu-img sees OVERLAY directly over BACKING, declared raw.
chain_is() {
    local info
    info=$(qemu-img info -U --output=json "$1")
    echo "$info" | jq '{filename, "backing-filename", "backing-filename-format"}'
    [ "$(jq -r '."backing-filename"' <<<"$info")" = "$2" ] &&
        [ "$(jq -r '."backing-filename-format"' <<<"$info")" = raw ]
}

nova_checks() {
    mkdir -p "$NOVA_BASE" "$NOVA/instance-1"
    # _base as Nova fills it: a download renamed into place, and Nova's own files.
    cp "$IMAGES/tiny.raw" "$NOVA_BASE/$NOVA_HASH.part"
    mv "$NOVA_BASE/$NOVA_HASH.part" "$NOVA_BASE/$NOVA_HASH"
    head -c 1M /dev/urandom >"$NOVA_BASE/swap_512"
    head -c 1M /dev/urandom >"$NOVA_BASE/ephemeral_1_0706d66"
    cp "$IMAGES/tinybase.raw" "$NOVA_BASE/${NOVA_HASH}_10"
    # The compute node's vmar.toml: _base is an image root, auto-capture on.
    sed -i "s|^image_roots = \[|image_roots = [\"$NOVA_BASE\", |" /etc/vmar/vmar.toml
    printf 'auto_capture = true\nauto_capture_settle = 2\n' >>/etc/vmar/vmar.toml
    grep -E "^(image_roots|auto_capture)" /etc/vmar/vmar.toml >>"$LOG"
    check "nova: systemctl restart vmard with auto-capture of _base" systemctl restart vmard
    check "nova: auto-capture took _base/$NOVA_HASH" \
        wait_until 60 bash -c "vmarctl --json images | jq -e '.images[] | select(.name == \"$NOVA_HASH\")'"
    local f
    for f in swap_512 ephemeral_1_0706d66 "${NOVA_HASH}_10"; do
        check "nova: auto-capture skipped $f as Nova's own file" wait_until 20 skipped_as_nova "$NOVA_BASE/$f"
        check "nova: $f is not captured" bash -c "! vmarctl --json images | jq -e '.images[] | select(.path == \"$NOVA_BASE/$f\")'"
    done
    vmarctl images 2>&1 | sed 's/^/    /'

    # An instance disk as Nova makes it, then rebased onto the vmar device and back.
    local disk=$NOVA/instance-1/disk
    check "nova: qemu-img create the instance disk over _base/HASH" \
        qemu-img create -q -f qcow2 -b "$NOVA_BASE/$NOVA_HASH" -F raw "$disk"
    check "nova: vmarctl ensure HASH (twice: idempotent)" \
        bash -c "vmarctl ensure $NOVA_HASH && vmarctl ensure $NOVA_HASH"
    check "nova: qemu-img rebase -u onto /dev/vmar/HASH" \
        qemu-img rebase -u -b "/dev/vmar/$NOVA_HASH" -F raw "$disk"
    check "nova: the disk is over /dev/vmar/HASH, raw" chain_is "$disk" "/dev/vmar/$NOVA_HASH"
    check "nova: the disk reads the same through the device (qemu-img compare)" \
        qemu-img compare -U "$disk" "$NOVA_BASE/$NOVA_HASH"
    check "nova: vmarctl libvirt-xml --overlay accepts the rebased disk" \
        vmarctl libvirt-xml "$NOVA_HASH" --overlay "$disk"
    check "nova: vmarctl libvirt-xml --overlay refuses a disk over _base (exit 5)" \
        bash -c "cp $disk $T/other.qcow2 && qemu-img rebase -u -b $NOVA_BASE/$NOVA_HASH -F raw $T/other.qcow2 &&
            vmarctl libvirt-xml $NOVA_HASH --overlay $T/other.qcow2; [ \$? = 5 ]"
    check "nova: rebase back onto _base/HASH (live migration to a host without vmar)" \
        qemu-img rebase -u -b "$NOVA_BASE/$NOVA_HASH" -F raw "$disk"
    check "nova: the disk is over _base/HASH again" chain_is "$disk" "$NOVA_BASE/$NOVA_HASH"
    check "nova: it reads the same" qemu-img compare -U "$disk" "$NOVA_BASE/$NOVA_HASH"
    # Boot 2 starts it as Nova would (no <backingStore> in the XML) over the device.
    qemu-img rebase -u -b "/dev/vmar/$NOVA_HASH" -F raw "$disk"
}

# hook_domain NAME DISK-XML: defines domain NAME (the tiny VM) with DISK-XML as its disk.
hook_domain() {
    printf '%s\n' "$2" >"$T/$1.disk"
    sed "s/vmar-tiny/$1/g" "$T/domain.xml" |
        awk -v disk="$T/$1.disk" '/@DISK@/ { while ((getline l < disk) > 0) print "    " l; next } { print }' \
            >"$T/$1.xml"
    virsh define "$T/$1.xml" >>"$LOG" 2>&1
}
block_disk() {
    echo "<disk type='block' device='disk'><driver name='qemu' type='raw' cache='none' io='native'/><source dev='/dev/vmar/$1'/><target dev='vda' bus='virtio'/><readonly/></disk>"
}
running() { [ "$(virsh domstate "$1" 2>/dev/null)" = running ]; }
# Both domains started by `virsh start` at the same moment.
start_both() {
    virsh start "$1" >"$T/start-$1.out" 2>&1 &
    local a=$!
    virsh start "$2" >"$T/start-$2.out" 2>&1 &
    local b=$!
    local ra=0 rb=0
    wait $a || ra=$?
    wait $b || rb=$?
    cat "$T/start-$1.out" "$T/start-$2.out"
    [ $ra = 0 ] && [ $rb = 0 ] && running "$1" && running "$2"
}

hook_checks() {
    check "hook: /etc/libvirt/hooks/qemu.d/vmar is installed, executable, a conffile" \
        bash -c 'test -x /etc/libvirt/hooks/qemu.d/vmar && dpkg-query -W -f="\${Conffiles}" vmar | grep -q /etc/libvirt/hooks/qemu.d/vmar'
    vmarctl remove tiny >>"$LOG" 2>&1
    check "hook: no /dev/vmar/tiny before the domain starts" bash -c '! test -e /dev/vmar/tiny'
    hook_domain hook-a "$(block_disk tiny)"
    hook_domain hook-b "$(block_disk tiny)"
    check "hook: virsh start of a domain on /dev/vmar/tiny, no device present: the hook creates it" \
        virsh start hook-a
    check "hook: /dev/vmar/tiny exists and serves tiny" cmp /dev/vmar/tiny "$IMAGES/tiny.raw"
    virsh destroy hook-a >>"$LOG" 2>&1
    vmarctl remove tiny >>"$LOG" 2>&1
    check "hook: two domains on /dev/vmar/tiny started at once both start" start_both hook-a hook-b
    virsh destroy hook-a >>"$LOG" 2>&1
    virsh destroy hook-b >>"$LOG" 2>&1

    # Nova's way: the XML names only the instance disk; its header names /dev/vmar/HASH.
    if [ -e "$NOVA/instance-1/disk" ]; then
        vmarctl remove "$NOVA_HASH" >>"$LOG" 2>&1
        hook_domain hook-nova "<disk type='file' device='disk'><driver name='qemu' type='qcow2' cache='none'/><source file='$NOVA/instance-1/disk'/><target dev='vda' bus='virtio'/></disk>"
        # virt-aa-helper follows the chain in the header to /dev/vmar/HASH (a device node of
        # its own, which vmar's AppArmor line lets it read) and grants the VM that device.
        check "hook: a Nova-style domain (chain only in its qcow2 header) starts under AppArmor" \
            virsh start hook-nova
        check "hook: virt-aa-helper granted the Nova-style domain /dev/vmar/HASH" \
            bash -c "grep -h '/dev/vmar/$NOVA_HASH' /etc/apparmor.d/libvirt/libvirt-*.files"
        check "hook: no AppArmor denial for the Nova-style domain" \
            bash -c '! journalctl -k -b --no-pager | grep -a "apparmor=\"DENIED\"" | grep -a libvirt'
        virsh destroy hook-nova >>"$LOG" 2>&1
        check "hook: for a Nova instance disk (chain only in its header) the hook created /dev/vmar/HASH" \
            test -b "/dev/vmar/$NOVA_HASH"
    fi

    # A name re-pointed at other content is refused, by vmarctl and at a domain's start.
    vmarctl remove tiny >>"$LOG" 2>&1
    check "hook: vmarctl create tiny tinybase is refused (the name served tiny; exit 5)" \
        bash -c 'vmarctl create tiny tinybase; [ $? = 5 ]'
    # Content found nowhere else (a copy of tinybase would still be served by fingerprint).
    cp "$IMAGES/tinybase.raw" "$IMAGES/repoint.raw"
    printf 'repoint' | dd of="$IMAGES/repoint.raw" bs=1 seek=4096 conv=notrunc status=none
    {
        vmarctl capture "$IMAGES/repoint.raw"
        vmarctl create repoint repoint
        vmarctl remove repoint
        vmarctl forget repoint
    } >>"$LOG" 2>&1
    cp "$IMAGES/tiny.raw" "$IMAGES/repoint.raw"
    vmarctl capture "$IMAGES/repoint.raw" >>"$LOG" 2>&1
    hook_domain hook-c "$(block_disk repoint)"
    check "hook: a domain on a name whose image has other bytes now fails to start, saying why" \
        bash -c '! virsh start hook-c >'"$T"'/start-c.out 2>&1; cat '"$T"'/start-c.out; grep -q "served image" '"$T"'/start-c.out'
    check "hook: and /dev/vmar/repoint was not created" bash -c '! test -e /dev/vmar/repoint'
    for d in hook-a hook-b hook-c hook-nova; do virsh undefine "$d" >>"$LOG" 2>&1; done

    # Pool-based tools: libvirt's dir pool lists the block devices in /dev/vmar.
    vmarctl ensure tiny >>"$LOG" 2>&1
    check "pool: virsh pool-define /usr/share/vmar/libvirt-pool.xml, pool-start vmar" \
        bash -c 'virsh pool-define /usr/share/vmar/libvirt-pool.xml && virsh pool-start vmar'
    # libvirt 9.0 types the dir pool's volumes "file" even where they are block devices.
    check "pool: virsh vol-list vmar lists tiny with its path and size" \
        bash -c 'virsh pool-refresh vmar; virsh vol-list vmar --details; virsh vol-list vmar --details | grep -E "^ *tiny +/dev/vmar/tiny +(block|file) +16\.00 MiB"'
    virsh pool-destroy vmar >>"$LOG" 2>&1
    virsh pool-undefine vmar >>"$LOG" 2>&1
}
