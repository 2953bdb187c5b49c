//! Man pages generated from the CLI definition: vmarctl(1) and vmarctl-COMMAND(1) for every
//! subcommand, each with EXIT STATUS, FILES, ENVIRONMENT and EXAMPLES after what clap_mangen
//! renders from the clap definition (NAME, SYNOPSIS, DESCRIPTION, OPTIONS).

use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result};
use vmar::error::ExitClass;

/// Examples by subcommand ("" for the main page): (what it does, command line).
const EXAMPLES: &[(&str, &str, &str)] = &[
    (
        "",
        "Capture two images, then serve one as a device",
        "vmarctl capture /var/lib/vmar/images/base.raw /var/lib/vmar/images/web.raw\nvmarctl create web1 web",
    ),
    (
        "",
        "Names of all images, one a line, for a script",
        "vmarctl images --noheadings -o name",
    ),
    (
        "",
        "Stop a script when vmard is down (exit status 6)",
        "vmarctl ping || [ $? -ne 6 ] || echo 'vmard is down'",
    ),
    (
        "ping",
        "Wait until vmard answers, e.g. in a unit ordered after it",
        "until vmarctl ping >/dev/null; do sleep 1; done",
    ),
    (
        "check",
        "A Nagios or Icinga service on the vmar host (NRPE command definition)",
        "command[check_vmar]=/usr/bin/vmarctl check",
    ),
    (
        "check",
        "Only the problems, for a script",
        "vmarctl --json check | jq -r '.problems[] | \"\\(.severity) \\(.subject): \\(.message)\"'",
    ),
    (
        "capture",
        "Capture every raw image of a libvirt pool",
        "vmarctl capture /var/lib/libvirt/images/*.raw",
    ),
    (
        "capture",
        "Capture an image again after it changed",
        "vmarctl capture --recapture /var/lib/vmar/images/base.raw",
    ),
    (
        "capture",
        "Capture a fleet's images in the manifest's order and report this host's maps",
        "vmarctl capture --manifest /srv/images/fleet.manifest",
    ),
    (
        "fleet-status",
        "Which hosts serve another content or map than the others (exit status 3 if any)",
        "vmarctl fleet-status /srv/images/fleet.manifest",
    ),
    (
        "images",
        "Names and fingerprints, tab-separated, sizes in bytes",
        "vmarctl images --noheadings --separator \"$(printf '\\t')\" -o name,size,fingerprint --units b",
    ),
    (
        "images",
        "Compare what two hosts serve before a live migration",
        "diff <(ssh hostA vmarctl images -o name,fingerprint) <(ssh hostB vmarctl images -o name,fingerprint)",
    ),
    (
        "map",
        "First extents of a map",
        "vmarctl map web --extents | head",
    ),
    (
        "table",
        "Table over known block devices",
        "vmarctl table web --device base=/dev/loop3 --device web=/dev/loop4",
    ),
    (
        "verify",
        "Verify an image; exit status 3 means a mismatch",
        "vmarctl verify web; echo $?",
    ),
    (
        "forget",
        "Forget an image; the maps that read from it change and are listed",
        "vmarctl forget base",
    ),
    (
        "create",
        "Serve image web as /dev/vmar/web1, with a qcow2 overlay for a VM",
        "vmarctl create web1 web\nqemu-img create -f qcow2 -b /dev/vmar/web1 -F raw vm1.qcow2",
    ),
    (
        "create",
        "Capture a file and serve it in one step",
        "vmarctl create db1 /var/lib/vmar/images/db.raw --capture",
    ),
    (
        "create",
        "Serve other content under a name that served another image (nothing backs onto it)",
        "vmarctl create tmp db --rebind",
    ),
    (
        "ensure",
        "In a script: make sure /dev/vmar/web1 serves web (exit 0 if it already does)",
        "vmarctl ensure web1 web",
    ),
    (
        "ensure",
        "A Nova base image, served under its own name",
        "vmarctl ensure 0123456789abcdef0123456789abcdef01234567",
    ),
    (
        "remove",
        "Remove a device a VM still has open, at its last close",
        "vmarctl remove web1 --deferred",
    ),
    (
        "list",
        "Devices that are not active",
        "vmarctl list --noheadings -o name,state | awk '$2 != \"active\"'",
    ),
    (
        "status",
        "One device with its live table",
        "vmarctl status web1 --table",
    ),
    (
        "refresh",
        "Give a running device the current map of its image",
        "vmarctl refresh web1",
    ),
    (
        "stats",
        "Read statistics of all devices as JSON",
        "vmarctl --json stats",
    ),
    (
        "stats",
        "What device web1 reads, every 5 seconds, 12 times",
        "vmarctl stats /dev/vmar/web1 --interval 5 --count 12",
    ),
    (
        "stats",
        "Page cache of each image file, for a script (one table)",
        "vmarctl stats --noheadings -o image_file,cached --units b",
    ),
    (
        "metrics",
        "What Prometheus scrapes, as any user, through the read-only socket",
        "vmarctl --socket /run/vmar/vmard.ro.sock metrics",
    ),
    (
        "metrics",
        "node_exporter's textfile collector (vmar-metrics.timer does this every minute)",
        "vmarctl metrics --output /var/lib/prometheus/node-exporter/vmar.prom",
    ),
    (
        "dependents",
        "Everything that keeps image base from being forgotten",
        "vmarctl dependents base",
    ),
    (
        "record",
        "After a VM booted from /dev/vmar/web1: keep what it read as web's boot working set",
        "vmarctl record web1",
    ),
    (
        "record",
        "Once its application ran too: a second phase",
        "vmarctl record web1 --phase app",
    ),
    (
        "working-set",
        "The working sets recorded for web1's image, with their runs",
        "vmarctl working-set web1 --extents",
    ),
    (
        "warm",
        "Before starting four VMs: read their images' working sets, shared blocks once",
        "vmarctl warm web1 web2 db1 db2",
    ),
    (
        "warm",
        "Stop every running warm (the VMs are starting anyway)",
        "vmarctl warm --cancel",
    ),
    (
        "bindings",
        "Names bound to content no image has any more (a create of another image under them needs --rebind)",
        "vmarctl --json bindings | jq -r '.bindings[] | select(.servable | not) | .name'",
    ),
    (
        "restore-status",
        "Which devices the restore at vmard's start could not restore, and why",
        "vmarctl restore-status || journalctl -u vmard -b",
    ),
    (
        "libvirt-xml",
        "A disk element for a VM, over an overlay",
        "vmarctl libvirt-xml web1 --overlay /var/lib/libvirt/images/vm1.qcow2",
    ),
    (
        "libvirt-hook",
        "What libvirt runs at a domain's start (/etc/libvirt/hooks/qemu.d/vmar)",
        "virsh dumpxml vm1 | vmarctl libvirt-hook vm1 prepare begin -",
    ),
    (
        "completions",
        "Install bash completions for the current user",
        "vmarctl completions bash > ~/.local/share/bash-completion/completions/vmarctl",
    ),
    (
        "man",
        "Write every page into a directory",
        "vmarctl man --dir /usr/share/man/man1",
    ),
    (
        "help",
        "Help of one command (its man page says more)",
        "vmarctl help capture",
    ),
];

/// Escapes text for roff: backslashes, and a leading dot or quote that would start a request.
fn roff(text: &str) -> String {
    let escaped = text.replace('\\', "\\e").replace('-', "\\-");
    if escaped.starts_with('.') || escaped.starts_with('\'') {
        format!("\\&{escaped}")
    } else {
        escaped
    }
}

fn section(out: &mut dyn Write, title: &str) -> std::io::Result<()> {
    writeln!(out, ".SH \"{title}\"")
}

/// The sections clap does not know: EXIT STATUS, FILES, ENVIRONMENT, EXAMPLES.
fn extra_sections(out: &mut dyn Write, subcommand: &str) -> std::io::Result<()> {
    section(out, "EXIT STATUS")?;
    writeln!(
        out,
        "{}",
        roff(
            "By class, so that scripts can tell them apart; with --json, the error object's kind names the exact cause. With several images, capture exits with the class of the first that failed."
        )
    )?;
    if subcommand == "check" {
        writeln!(
            out,
            "{}",
            roff(
                "check exits with Nagios' statuses instead of the classes below: 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN (vmard cannot be asked)."
            )
        )?;
    }
    for (class, text) in ExitClass::ALL {
        writeln!(out, ".TP\n.B {}\n{}", class.code(), roff(text))?;
    }
    section(out, "FILES")?;
    for (path, text) in [
        (
            vmar::protocol::DEFAULT_SOCKET,
            "vmard's socket (mode 0600, or 0660 with socket_group of vmar.toml).",
        ),
        (
            vmar::protocol::DEFAULT_RO_SOCKET,
            "vmard's read-only socket (mode 0666): ping, images, map, table, list, status, stats, metrics, dependents, restore-status and working-set for any user.",
        ),
        (
            vmar::config::DEFAULT_CONFIG,
            "vmard's configuration: image_roots, socket_group, max_targets, auto_capture.",
        ),
        (
            "/var/lib/vmar",
            "vmard's state: the catalog and its backup.",
        ),
        (
            "/dev/vmar/NAME",
            "device NAME, read-only (also /dev/mapper/vmar-NAME); device arguments take either path or NAME.",
        ),
    ] {
        writeln!(out, ".TP\n.I {}\n{}", roff(path), roff(text))?;
    }
    section(out, "ENVIRONMENT")?;
    writeln!(
        out,
        ".TP\n.B VMAR_SOCKET\n{}",
        roff("vmard's socket, as --socket gives it.")
    )?;
    writeln!(
        out,
        ".TP\n.B VMAR_TIMEOUT\n{}",
        roff("seconds to wait for vmard to accept or send anything, as --timeout gives it.")
    )?;
    section(out, "EXAMPLES")?;
    for (_, what, command) in EXAMPLES.iter().filter(|(s, _, _)| *s == subcommand) {
        writeln!(out, "{}:\n.PP\n.nf\n.RS 4", roff(what))?;
        for line in command.lines() {
            writeln!(out, "{}", roff(line))?;
        }
        writeln!(out, ".RE\n.fi\n.PP")?;
    }
    section(out, "SEE ALSO")?;
    writeln!(
        out,
        "{}",
        roff("vmarctl(1), vmard(8), vmar.toml(5), dmsetup(8), lvs(8)")
    )?;
    Ok(())
}

/// Renders one page: clap_mangen's sections, then ours.
fn render(command: clap::Command, subcommand: &str, out: &mut dyn Write) -> Result<()> {
    let man = clap_mangen::Man::new(command);
    let mut page = Vec::new();
    man.render_title(&mut page)?;
    man.render_name_section(&mut page)?;
    man.render_synopsis_section(&mut page)?;
    man.render_description_section(&mut page)?;
    let mut options = Vec::new();
    man.render_options_section(&mut options)?;
    page.extend_from_slice(&options);
    if !String::from_utf8_lossy(&options).contains(".SH") {
        // clap_mangen leaves the section out when there is nothing to list (help).
        writeln!(page, ".SH OPTIONS")?;
        writeln!(page, "{}", roff("None; name the command to describe."))?;
    }
    if subcommand.is_empty() {
        man.render_subcommands_section(&mut page)?;
    }
    extra_sections(&mut page, subcommand)?;
    man.render_version_section(&mut page)?;
    out.write_all(&page)?;
    Ok(())
}

/// vmarctl(1), or with `dir`, it and vmarctl-COMMAND(1) of every visible subcommand written
/// into `dir`.
pub fn generate(mut command: clap::Command, dir: Option<&Path>, out: &mut dyn Write) -> Result<()> {
    // Propagates global options (--socket, --json) into the subcommands' pages.
    command.build();
    let Some(dir) = dir else {
        return render(command, "", out);
    };
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut pages = vec![(String::from("vmarctl"), command.clone(), String::new())];
    for sub in command.get_subcommands().filter(|s| !s.is_hide_set()) {
        let name = format!("vmarctl-{}", sub.get_name());
        let page = sub
            .clone()
            .name(name.clone())
            .bin_name(format!("vmarctl {}", sub.get_name()))
            .display_name(name.clone())
            .version(env!("CARGO_PKG_VERSION"));
        pages.push((name, page, sub.get_name().to_string()));
    }
    for (name, page, subcommand) in pages {
        let path = dir.join(format!("{name}.1"));
        let mut file = std::fs::File::create(&path)
            .with_context(|| format!("cannot write {}", path.display()))?;
        render(page, &subcommand, &mut file)?;
        writeln!(out, "{}", path.display())?;
    }
    Ok(())
}
