# shellcheck shell=bash disable=SC2016
# Operations checks of tools/system-test.py, sourced by tools/system-test-guest.sh (whose say,
# check, ok, fail, table, same_table, $T, $IMAGES and $LOG they use): monitoring (metrics, the
# node_exporter textfile timer, the read-only socket, uid/pid in the log), the watchdog, a
# reload with a bad configuration, the restore check unit and udev triggers. The metrics the
# guest prints are left in $T/*.prom on the data disk; the host checks them with promtool.

# Devices and loop devices vmar-udev-trigger would send events to.
trigger_lists_only_vmar() {
    local listed foreign
    listed=$(/usr/lib/vmar/vmar-udev-trigger --print)
    echo "listed: $listed"
    foreign=$(losetup --show -f -r "$T/foreign.img") || return 1
    listed=$(/usr/lib/vmar/vmar-udev-trigger --print)
    echo "with foreign $foreign: $listed"
    losetup -d "$foreign"
    # (Loop devices attached by an earlier vmard show a backing path relative to the data
    # disk once its mount namespace is gone, so they may not be listed: see table().)
    grep -qx "dm-[0-9]*" <<<"$listed" && ! grep -qx "${foreign#/dev/}" <<<"$listed"
}

# Waits up to $2 seconds for command $1 (a string for bash -c) to succeed.
wait_for() {
    local _
    for _ in $(seq "$2"); do
        bash -c "$1" && return 0
        sleep 1
    done
    return 1
}

ops_boot1() {
    check "ops: vmar-restore-check.service ran after vmard and passed" \
        bash -c 'systemctl is-active vmar-restore-check.service && [ "$(systemctl show -P Result vmar-restore-check.service)" = success ]'
    check "ops: vmar-metrics.timer is enabled and waiting" \
        bash -c 'systemctl is-enabled vmar-metrics.timer && systemctl is-active vmar-metrics.timer'
    check "ops: without node_exporter's directory vmar-metrics.service is skipped, not failed" \
        bash -c '! test -d /var/lib/prometheus/node-exporter && systemctl start vmar-metrics.service && ! systemctl is-failed vmar-metrics.service && [ "$(systemctl show -P ConditionResult vmar-metrics.service)" = no ]'
    mkdir -p /var/lib/prometheus/node-exporter
    check "ops: with it, vmar-metrics.service writes vmar.prom" \
        bash -c 'systemctl start vmar-metrics.service && test -s /var/lib/prometheus/node-exporter/vmar.prom && ! ls /var/lib/prometheus/node-exporter | grep -v "^vmar.prom$"'
    cp /var/lib/prometheus/node-exporter/vmar.prom "$T/timer.prom" 2>>"$LOG"
    vmarctl metrics >"$T/metrics.prom" 2>>"$LOG"
    check "ops: metrics show device tiny active and the sharing factor" \
        bash -c "grep -E '^vmar_device_state\\{device=\"tiny\",node=\"/dev/vmar/tiny\",image=\"tiny\",state=\"active\"\\} 1$' $T/metrics.prom && grep '^vmar_sharing_factor ' $T/metrics.prom"

    # The read-only socket: anyone may look, nobody may change.
    check "ops: the read-only socket is mode 0666" test "$(stat -c %a /run/vmar/vmard.ro.sock)" = 666
    check "ops: nobody lists devices and reads metrics on the read-only socket" \
        setpriv --reuid=65534 --regid=65534 --clear-groups \
        bash -c 'vmarctl --socket /run/vmar/vmard.ro.sock list && vmarctl --socket /run/vmar/vmard.ro.sock metrics >/dev/null'
    check "ops: nobody cannot remove a device through the read-only socket (exit 6)" \
        setpriv --reuid=65534 --regid=65534 --clear-groups \
        bash -c 'vmarctl --socket /run/vmar/vmard.ro.sock remove tiny; [ $? = 6 ]'
    check "ops: nobody cannot use the main socket" \
        setpriv --reuid=65534 --regid=65534 --clear-groups bash -c '! vmarctl list'
    check "ops: the journal names the caller of each request (uid=65534 and its pid)" \
        wait_for "journalctl -u vmard -o cat --no-pager | grep -E 'uid=65534 pid=[0-9]+ read_only=true'" 10
    check "ops: device arguments may be /dev/vmar/NAME and /dev/mapper/vmar-NAME" \
        bash -c 'vmarctl status /dev/vmar/tiny && vmarctl status /dev/mapper/vmar-tiny'
    check "ops: dependents of tinybase lists device tiny and image tiny" \
        bash -c 'out=$(vmarctl --json dependents tinybase); echo "$out"; jq -e ".devices | map(.name) | index(\"tiny\")" <<<"$out" && jq -e ".images | map(.name) | index(\"tiny\")" <<<"$out"'
    truncate -s 1M "$T/foreign.img"
    check "ops: vmar-udev-trigger lists vmar's dm and loop devices, not a foreign loop device" \
        trigger_lists_only_vmar

    # A bad vmar.toml fails `systemctl reload`; vmard keeps running with the old one.
    local pid
    pid=$(systemctl show -P MainPID vmard)
    cp /etc/vmar/vmar.toml "$T/vmar.toml.good"
    echo 'image_roots = [' >>/etc/vmar/vmar.toml
    check "ops: vmard --check-config refuses the bad file" bash -c '! vmard --check-config'
    check "ops: systemctl reload fails on a bad vmar.toml" bash -c '! systemctl reload vmard'
    check "ops: after the failed reload vmard still runs, same process" \
        bash -c "systemctl is-active vmard && [ \"\$(systemctl show -P MainPID vmard)\" = $pid ]"
    cp "$T/vmar.toml.good" /etc/vmar/vmar.toml
    check "ops: systemctl reload succeeds with the good file again" systemctl reload vmard

    # The watchdog: pings arrive; a vmard that stops answering is restarted, devices kept.
    check "ops: WatchdogSec=30s" test "$(systemctl show -P WatchdogUSec vmard)" = 30s
    check "ops: vmard pinged the watchdog" \
        wait_for '[ "$(systemctl show -P WatchdogTimestampMonotonic vmard)" -gt 0 ]' 30
    local before
    before=$(table tiny)
    kill -STOP "$pid"
    check "ops: systemd finds a stopped (hung) vmard by its watchdog within 60 s" \
        wait_for "journalctl -u vmard --no-pager | grep -i 'watchdog timeout'" 60
    # Its SIGABRT waits for the process to run again (else SIGKILL after TimeoutAbortSec).
    kill -CONT "$pid"
    check "ops: the watchdog restarted vmard" \
        wait_for "p=\$(systemctl show -P MainPID vmard); [ \"\$p\" != 0 ] && [ \"\$p\" != $pid ] && systemctl is-active vmard" 120
    check "ops: after the watchdog restart tiny is live with the same table" same_table tiny "$before"

    # A device whose image lives on a tmpfs cannot be restored after the reboot (boot 2).
    mkdir -p /srv/images2/volatile
    mount -t tmpfs -o size=32M vmar-volatile /srv/images2/volatile
    head -c 1M /dev/urandom >/srv/images2/volatile/doomed.raw
    check "ops: capture and create doomed (its image on a tmpfs, gone after the reboot)" \
        bash -c 'vmarctl capture /srv/images2/volatile/doomed.raw && vmarctl create doomed doomed'
}

ops_boot2() {
    systemctl --failed --no-legend --plain >>"$LOG" 2>&1
    check "ops: after reboot: vmard active, the status line starts with DEGRADED" \
        bash -c 's=$(systemctl show -P StatusText vmard); echo "$s"; systemctl is-active vmard && [[ $s == "DEGRADED: "*" not restored ("*doomed* ]]'
    check "ops: after reboot: vmar-restore-check.service failed" systemctl is-failed vmar-restore-check.service
    # is-system-running says "starting" while this test's own boot job runs; what makes it
    # say "degraded" afterwards is the manager's count of failed units.
    check "ops: after reboot: the manager counts the failed unit (is-system-running: degraded)" \
        bash -c 'systemctl is-system-running; systemctl list-units --failed --no-legend --plain | grep "^vmar-restore-check.service" && [ "$(systemctl show -P NFailedUnits)" -ge 1 ]'
    check "ops: after reboot: vmarctl list says why doomed is missing" \
        bash -c 'vmarctl --json list | jq -e ".devices[] | select(.name == \"doomed\") | .state == \"missing\" and (.reason | test(\"restore\"))"'
    vmarctl metrics >"$T/metrics2.prom" 2>>"$LOG"
    check "ops: after reboot: metrics say the restore failed and doomed is missing" \
        bash -c "grep -x 'vmar_restore_success 0' $T/metrics2.prom && grep -E '^vmar_device_state\\{device=\"doomed\".*state=\"missing\"\\} 1$' $T/metrics2.prom && grep -x 'vmar_image_missing{image=\"doomed\"} 1' $T/metrics2.prom"
    check "ops: remove doomed, restart vmard" \
        bash -c 'vmarctl remove doomed && systemctl restart vmard'
    # The check's own restart (PartOf=) may still be running when `systemctl restart` returns.
    check "ops: after the restart the restore check passes again" \
        wait_for 'systemctl is-active vmar-restore-check.service' 60
    check "ops: the timer wrote vmar.prom after the reboot" \
        wait_for '[ "$(stat -c %Y /var/lib/prometheus/node-exporter/vmar.prom)" -gt "$(date -d "$(uptime -s)" +%s)" ]' 90
    cp /var/lib/prometheus/node-exporter/vmar.prom "$T/timer2.prom" 2>>"$LOG"
}
