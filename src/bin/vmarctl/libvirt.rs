//! libvirt: `libvirt-xml` (a `<disk>` element, with a checked qcow2 overlay) and
//! `libvirt-hook` (ensures the devices a starting domain names).

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Args;
use vmar::error::ExitClass;
use vmar::name::DeviceName;
use vmar::protocol::request;

use crate::context::{Ctx, Run, device_arg};
use crate::output::{Usage, print_json};

#[derive(Args, Debug)]
pub struct LibvirtXmlArgs {
    #[arg(value_parser = device_arg)]
    name: String,
    /// Guest disk name.
    #[arg(long, default_value = "vda")]
    target: String,
    /// A qcow2 overlay file backed by the device. A missing one is created (after
    /// `ensure NAME`) with `qemu-img create -f qcow2 -b /dev/vmar/NAME -F raw FILE`; an
    /// existing one must be qcow2 backed by /dev/vmar/NAME declared raw, of the image's
    /// size (`qemu-img info --backing-chain`), or is refused (exit status 5). Without
    /// --overlay the disk is the device itself, read-only.
    #[arg(long)]
    overlay: Option<PathBuf>,
}

impl Run for LibvirtXmlArgs {
    fn run(&self, ctx: &Ctx, out: &mut dyn Write) -> Result<ExitClass> {
        let name = &DeviceName::new(self.name.as_str())?;
        let overlay = self.overlay.as_deref();
        // libvirt's XML is text: a path that is not UTF-8 would be written altered.
        if let Some(path) = overlay.filter(|p| p.to_str().is_none()) {
            bail!(Usage(format!(
                "--overlay {}: the path is not valid UTF-8, and libvirt's XML holds text: rename it",
                path.display()
            )));
        }
        let overlay = overlay
            .map(std::path::absolute)
            .transpose()
            .context("cannot resolve the overlay path")?;
        match &overlay {
            Some(path) => {
                if path.exists() {
                    // Its header first (readable without the device): over this device, raw.
                    let top = vmar::overlay::parse_info(path, &vmar::overlay::info(path, false)?)?;
                    vmar::overlay::check_top(path, &top, name)?;
                }
                // The device must serve the content its name is bound to, live, so that
                // qemu-img can open the whole chain.
                let ensured = ctx.call(request::Ensure::bound(name.clone()))?;
                if path.exists() {
                    // An existing overlay must be directly over this device, of its image's
                    // size.
                    let size = ctx
                        .images()?
                        .images
                        .into_iter()
                        .find(|i| i.name == ensured.image)
                        .map(|i| i.size)
                        .with_context(|| {
                            format!("image {} is not in the catalog", ensured.image)
                        })?;
                    let chain =
                        vmar::overlay::parse_chain(path, &vmar::overlay::info(path, true)?)?;
                    vmar::overlay::check_chain(path, &chain, name, size)?;
                } else {
                    vmar::overlay::create(path, name)?;
                }
            }
            None => {
                // The device must be one vmard knows.
                ctx.call(request::Status {
                    name: name.clone(),
                    table: false,
                })?;
            }
        }
        let xml = vmar::libvirt::disk_xml(name, &self.target, overlay.as_deref())?;
        if ctx.json {
            print_json(out, &serde_json::json!({ "xml": xml }))?;
        } else {
            write!(out, "{xml}")?;
        }
        Ok(ExitClass::Success)
    }
}

#[derive(Args, Debug)]
pub struct LibvirtHookArgs {
    /// Domain name.
    domain: String,
    /// libvirt's operation (prepare, start, started, stopped, release, migrate, ...).
    operation: String,
    /// Its sub-operation (begin, end, -).
    sub_operation: String,
    /// libvirt's extra argument (unused).
    extra: Option<String>,
}

/// The libvirt hook: ensures the vmar devices a starting domain names. Output goes to
/// stderr, which libvirt puts in the error of a start it fails.
impl Run for LibvirtHookArgs {
    fn run(&self, ctx: &Ctx, _out: &mut dyn Write) -> Result<ExitClass> {
        use std::io::Read;
        let domain = &self.domain;
        // libvirt writes the XML whatever the operation: read it all so it never gets EPIPE.
        let mut xml = String::new();
        std::io::stdin()
            .read_to_string(&mut xml)
            .context("cannot read the domain XML on stdin")?;
        if (self.operation.as_str(), self.sub_operation.as_str()) != ("prepare", "begin") {
            return Ok(ExitClass::Success);
        }
        let disks = vmar::hook::domain_disks(&xml)
            .with_context(|| format!("vmar hook: domain {domain}"))?;
        let mut names = disks.devices;
        for image in &disks.probe {
            // An image that cannot be read is libvirt's to report when it opens it.
            match vmar::overlay::chain_devices(image) {
                Ok(found) => names.extend(found),
                Err(e) => eprintln!(
                    "vmar hook: domain {domain}: not following {}: {e}",
                    image.display()
                ),
            }
        }
        let mut failed = Vec::new();
        for name in &names {
            if let Err(e) = ctx.call(request::Ensure::bound(name.clone())) {
                failed.push(format!("/dev/vmar/{name}: {e:#}"));
            }
        }
        if !failed.is_empty() {
            bail!(
                "vmar hook: domain {domain} cannot start: {}",
                failed.join("; ")
            );
        }
        Ok(ExitClass::Success)
    }
}
