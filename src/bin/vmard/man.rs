//! vmard(8) from the CLI definition plus SIGNALS, FILES, ENVIRONMENT, EXIT STATUS and SEE
//! ALSO; vmar.toml(5) from the configuration's key table ([`vmar::config::KEYS`]), so that
//! neither page can miss an option or a key.

use std::io::Write;

use anyhow::Result;

/// Text for roff: backslashes escaped, no line taken for a request.
fn roff(text: &str) -> String {
    let text = text.replace('\\', "\\e");
    match text.chars().next() {
        Some('.' | '\'') => format!("\\&{text}"),
        _ => text,
    }
}

fn items(out: &mut dyn Write, heading: &str, items: &[(&str, &str)]) -> Result<()> {
    writeln!(out, ".SH {heading}")?;
    for (term, text) in items {
        writeln!(out, ".TP\n.B {}\n{}", roff(term), roff(text))?;
    }
    Ok(())
}

/// vmard(8).
pub fn vmard(command: clap::Command, out: &mut dyn Write) -> Result<()> {
    let man = clap_mangen::Man::new(command).section("8");
    let mut page = Vec::new();
    man.render_title(&mut page)?;
    man.render_name_section(&mut page)?;
    man.render_synopsis_section(&mut page)?;
    man.render_description_section(&mut page)?;
    writeln!(
        page,
        "{}",
        roff(
            "vmard keeps the catalog of captured images in its state directory and answers vmarctl(1) over a Unix socket, one JSON request per connection. Under systemd (vmard.service, Type=notify) it restores every saved device before it reports ready, so VMs started after it find /dev/vmar/NAME. A device it cannot restore is reported (the unit's status line starts with DEGRADED, vmar-restore-check.service fails, and `vmarctl list` gives the reason) and the others are restored. Stopping vmard never removes a device."
        )
    )?;
    man.render_options_section(&mut page)?;
    items(
        &mut page,
        "SIGNALS",
        &[
            (
                "SIGTERM, SIGINT",
                "Stop: accept no more connections, let the requests in flight finish (a capture still hashing stops at its next batch, keeping nothing), close the catalog, exit 0. Devices stay as they are.",
            ),
            (
                "SIGHUP",
                "Re-read the configuration file: image_roots and max_targets change in the same process; socket_group and auto_capture apply at the next start. A bad file is logged and the old configuration kept (systemctl reload runs vmard --check-config first and fails instead).",
            ),
            (
                "SIGKILL (a crash)",
                "The catalog is crash-safe; the next start finishes or undoes the device change that was interrupted.",
            ),
        ],
    )?;
    items(
        &mut page,
        "FILES",
        &[
            (
                vmar::config::DEFAULT_CONFIG,
                "The configuration file, see vmar.toml(5).",
            ),
            (
                vmar::protocol::DEFAULT_SOCKET,
                "The socket: mode 0600, or 0660 owned by socket_group. Root, vmard's own user and the group's members are served (checked with SO_PEERCRED).",
            ),
            (
                vmar::protocol::DEFAULT_RO_SOCKET,
                "The read-only socket, mode 0666: any local user may ask what only reads (ping, images, map, table, list, status, stats, metrics, dependents, restore-status); other requests are refused with permission-denied.",
            ),
            (
                "/var/lib/vmar/catalog.redb, /var/lib/vmar/index/",
                "The catalog: images, their digests, maps and the saved devices.",
            ),
            (
                "/var/lib/vmar/backup/",
                "The catalog's backup (snapshot and journal), what --recover rebuilds from.",
            ),
            (
                "/dev/vmar/NAME",
                "Device NAME (also /dev/mapper/vmar-NAME), read-only: a block device node of its own, made and removed with the device by udev (61-vmar.rules, vmar-devnode). At start, before restoring, vmard removes nodes there that name no live vmar device of their name.",
            ),
            (
                "/lib/systemd/system/vmard.service",
                "The unit: Type=notify, WatchdogSec=, ExecReload= checks the configuration, then sends SIGHUP.",
            ),
            (
                "/lib/systemd/system/vmar-restore-check.service",
                "Runs after vmard starts and fails when a saved device was not restored, so that systemctl is-system-running says degraded.",
            ),
            (
                "/lib/systemd/system/vmar-metrics.timer",
                "Writes `vmarctl metrics` to /var/lib/prometheus/node-exporter/vmar.prom every minute when that directory exists (node_exporter's textfile collector).",
            ),
        ],
    )?;
    items(
        &mut page,
        "ENVIRONMENT",
        &[
            ("VMAR_CONFIG", "As --config."),
            ("VMAR_STATE_DIR", "As --state-dir."),
            ("VMAR_SOCKET", "As --socket."),
            ("VMAR_RO_SOCKET", "As --ro-socket."),
            ("VMAR_SOCKET_GROUP", "As --socket-group."),
            ("VMAR_MAX_TARGETS", "As --max-targets."),
            (
                "VMAR_LOG",
                "Log filter, e.g. debug (capture phase timings) or vmar=debug. Default info; every request is logged with the caller's uid and pid.",
            ),
            (
                "NOTIFY_SOCKET, WATCHDOG_USEC, WATCHDOG_PID",
                "Set by systemd: vmard reports READY=1 and a STATUS= line after the restore, and with WatchdogSec= sends WATCHDOG=1 at half the interval, each time after it answered a ping on its own socket.",
            ),
        ],
    )?;
    items(
        &mut page,
        "EXIT STATUS",
        &[
            (
                "0",
                "Stopped by SIGTERM or SIGINT after closing the catalog; or --check-config found the configuration good.",
            ),
            (
                "1",
                "Could not start (bad configuration, catalog that cannot be opened, another vmard on the socket), stopped on an error, or --check-config found the configuration bad.",
            ),
            ("2", "Bad command line."),
        ],
    )?;
    writeln!(page, ".SH SEE ALSO")?;
    writeln!(
        page,
        "{}",
        roff("vmarctl(1), vmar.toml(5), systemd.service(5), dmsetup(8), losetup(8)")
    )?;
    man.render_version_section(&mut page)?;
    out.write_all(&page)?;
    Ok(())
}

/// vmar.toml(5).
pub fn vmar_toml(out: &mut dyn Write) -> Result<()> {
    let version = env!("CARGO_PKG_VERSION");
    writeln!(out, ".TH vmar.toml 5 \"vmar {version}\"")?;
    writeln!(out, ".SH NAME\nvmar.toml \\- configuration of vmard")?;
    writeln!(out, ".SH SYNOPSIS\n{}", roff(vmar::config::DEFAULT_CONFIG))?;
    writeln!(
        out,
        ".SH DESCRIPTION\n{}",
        roff(
            "vmard(8) reads this TOML file at start (--config names another one). Command-line options override it. An unknown key is an error, so that a misspelt one is not silently ignored. `vmard --check-config` checks the file; `systemctl reload vmard` checks it and, when it is good, makes vmard re-read it (SIGHUP)."
        )
    )?;
    writeln!(out, ".SH KEYS")?;
    for (key, kind, default, text) in vmar::config::KEYS {
        writeln!(
            out,
            ".TP\n.BR {} \" = \" {}\n{}\n.br\nDefault: {}",
            roff(key),
            roff(kind),
            roff(text),
            roff(default)
        )?;
    }
    writeln!(out, ".SH EXAMPLE\n.nf\n.RS 4")?;
    for line in [
        "image_roots = [\"/var/lib/vmar/images\", \"/var/lib/nova/instances/_base\"]",
        "socket_group = \"vmar\"",
        "max_targets = 100000",
        "auto_capture = true",
        "auto_capture_settle = 30",
    ] {
        writeln!(out, "{}", roff(line))?;
    }
    writeln!(out, ".RE\n.fi")?;
    writeln!(out, ".SH SEE ALSO\nvmard(8), vmarctl(1)")?;
    Ok(())
}
