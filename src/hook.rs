//! What a libvirt domain needs of vmar, read from its XML: the vmar devices its disks and
//! their backing chains name. libvirt runs `/etc/libvirt/hooks/qemu.d/vmar` with the domain
//! XML on stdin at `prepare`, before it opens any disk; `vmarctl libvirt-hook` then ensures
//! each device (see [`crate::binding`]), so a domain defined on `/dev/vmar/NAME` starts
//! whether or not someone created the device first.
//!
//! A disk's chain is written out in the XML (`<backingStore>` elements, as `vmarctl
//! libvirt-xml --overlay` prints) or left for libvirt to find in the image headers (no
//! `<backingStore>`, as Nova and virt-install write it): those images are returned in
//! [`DomainDisks::probe`] for the caller to follow with qemu-img (see [`crate::overlay`]).
//! Pure: no I/O.

use std::collections::BTreeSet;
use std::path::PathBuf;

use crate::error::{Error, Result};
use crate::name::DeviceName;

/// The libvirt storage pool vmar ships over `/dev/vmar` (`virsh pool-define
/// /usr/share/vmar/libvirt-pool.xml`): a disk `<source pool='vmar' volume='NAME'/>` is
/// device NAME.
pub const POOL: &str = "vmar";

/// The vmar device a path names: `/dev/vmar/NAME` or `/dev/mapper/vmar-NAME`.
pub fn device_name(path: &str) -> Option<DeviceName> {
    let name = path
        .strip_prefix("/dev/vmar/")
        .or_else(|| path.strip_prefix("/dev/mapper/vmar-"))?;
    DeviceName::new(name).ok()
}

/// What [`domain_disks`] found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DomainDisks {
    /// vmar devices named directly (a disk's source, or a source in its `<backingStore>`).
    pub devices: BTreeSet<DeviceName>,
    /// Images (not vmar devices) whose backing chain the XML leaves to libvirt to find:
    /// their headers may name vmar devices.
    pub probe: Vec<PathBuf>,
}

/// The vmar devices a domain's disks name, and the images whose chains must be read.
pub fn domain_disks(xml: &str) -> Result<DomainDisks> {
    let doc = roxmltree::Document::parse(xml)
        .map_err(|e| Error::Protocol(format!("cannot parse the domain XML: {e}")))?;
    let root = doc.root_element();
    if !root.has_tag_name("domain") {
        return Err(Error::Protocol(format!(
            "the XML is a <{}>, not a <domain>",
            root.tag_name().name()
        )));
    }
    let mut found = DomainDisks::default();
    let disks = root
        .children()
        .filter(|n| n.has_tag_name("devices"))
        .flat_map(|d| d.children())
        .filter(|n| n.has_tag_name("disk"));
    for disk in disks {
        let format = disk
            .children()
            .find(|n| n.has_tag_name("driver"))
            .and_then(|d| d.attribute("type"));
        level(disk, format, &mut found);
    }
    Ok(found)
}

/// One level of a chain: the `<disk>` itself or a `<backingStore>`, with its format.
fn level(node: roxmltree::Node, format: Option<&str>, found: &mut DomainDisks) {
    let source = node.children().find(|n| n.has_tag_name("source"));
    let path = source.and_then(|s| s.attribute("dev").or_else(|| s.attribute("file")));
    if let Some(source) = source
        && source.attribute("pool") == Some(POOL)
        && let Some(volume) = source
            .attribute("volume")
            .and_then(|v| DeviceName::new(v).ok())
    {
        found.devices.insert(volume);
        return;
    }
    let Some(path) = path else {
        return;
    };
    if let Some(name) = device_name(path) {
        // A vmar device is raw: the chain ends here.
        found.devices.insert(name);
        return;
    }
    match node.children().find(|n| n.has_tag_name("backingStore")) {
        // An empty <backingStore/> says there is none.
        Some(backing) if backing.attribute("type").is_none() && !has_elements(backing) => {}
        Some(backing) => {
            let format = backing
                .children()
                .find(|n| n.has_tag_name("format"))
                .and_then(|f| f.attribute("type"));
            level(backing, format, found);
        }
        // libvirt reads the chain from the image itself; a raw image has none.
        None if format != Some("raw") => found.probe.push(PathBuf::from(path)),
        None => {}
    }
}

fn has_elements(node: roxmltree::Node) -> bool {
    node.children().any(|n| n.is_element())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn domain(disks: &str) -> String {
        format!("<domain type='kvm'><name>vm</name><devices>{disks}</devices></domain>")
    }

    #[test]
    fn device_paths_name_devices() {
        assert_eq!(device_name("/dev/vmar/web").as_deref(), Some("web"));
        assert_eq!(device_name("/dev/mapper/vmar-web").as_deref(), Some("web"));
        assert_eq!(device_name("/dev/vmar/../sda"), None);
        assert_eq!(device_name("/dev/vmar/"), None);
        assert_eq!(device_name("/dev/mapper/other"), None);
        assert_eq!(device_name("/var/lib/vmar/web.raw"), None);
    }

    #[test]
    fn block_disks_and_written_out_chains_name_devices() {
        let xml = domain(
            "<disk type='block' device='disk'><driver name='qemu' type='raw'/>\
               <source dev='/dev/vmar/base'/><target dev='vda'/><readonly/></disk>\
             <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>\
               <source file='/vm/top.qcow2'/>\
               <backingStore type='file'><format type='qcow2'/><source file='/vm/mid.qcow2'/>\
                 <backingStore type='block'><format type='raw'/>\
                   <source dev='/dev/mapper/vmar-web'/><backingStore/></backingStore>\
               </backingStore><target dev='vdb'/></disk>\
             <disk type='volume' device='disk'><driver name='qemu' type='raw'/>\
               <source pool='vmar' volume='db'/><target dev='vdc'/></disk>\
             <disk type='volume' device='disk'><source pool='default' volume='x.qcow2'/>\
               <target dev='vdd'/></disk>\
             <disk type='file' device='cdrom'><driver name='qemu' type='raw'/>\
               <source file='/iso/a.iso'/><target dev='sda'/></disk>\
             <disk type='network' device='disk'><source protocol='nbd' name='x'>\
               <host name='h'/></source><target dev='vde'/></disk>",
        );
        let found = domain_disks(&xml).unwrap();
        assert_eq!(
            found.devices.into_iter().collect::<Vec<_>>(),
            ["base", "db", "web"]
        );
        // Every chain is written out, or raw: nothing to read from image headers.
        assert!(found.probe.is_empty(), "{:?}", found.probe);
    }

    #[test]
    fn overlays_without_backing_store_are_probed() {
        let xml = domain(
            "<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>\
               <source file='/var/lib/nova/instances/i-1/disk'/><target dev='vda'/></disk>\
             <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>\
               <source file='/vm/flat.qcow2'/><backingStore/><target dev='vdb'/></disk>\
             <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>\
               <source file='/vm/top.qcow2'/>\
               <backingStore type='file'><format type='qcow2'/><source file='/vm/mid.qcow2'/>\
               </backingStore><target dev='vdc'/></disk>",
        );
        let found = domain_disks(&xml).unwrap();
        assert!(found.devices.is_empty());
        assert_eq!(
            found.probe,
            [
                PathBuf::from("/var/lib/nova/instances/i-1/disk"),
                PathBuf::from("/vm/mid.qcow2")
            ]
        );
    }

    #[test]
    fn bad_xml_is_an_error() {
        assert!(domain_disks("<domain><devices>").is_err());
        assert!(domain_disks("<network/>").is_err());
        // Disk paths that only look like vmar devices are not.
        let found = domain_disks(&domain(
            "<disk type='block'><source dev='/dev/vmar/a/b'/><target dev='vda'/></disk>",
        ))
        .unwrap();
        assert!(found.devices.is_empty());
    }
}
