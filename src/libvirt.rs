//! libvirt `<disk>` elements for vmar devices. QEMU must open the device with
//! `cache='none'` (O_DIRECT) so that the only cached copy of a block is the image file's page
//! shared by all devices; a VM's writes go to its own qcow2 overlay, or the disk is read-only.

use std::path::Path;

use crate::error::Result;
use crate::name::DeviceName;

/// Stable path of a vmar device, made by vmar's udev rule.
pub fn device_path(name: &str) -> String {
    crate::kernel::node_path(name).display().to_string()
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('\'', "&apos;")
        .replace('"', "&quot;")
}

/// The `<disk>` element for device `name` as disk `target` (e.g. `vda`): a qcow2 `overlay`
/// file backed by the device, or without one, the device itself read-only.
pub fn disk_xml(name: &DeviceName, target: &str, overlay: Option<&Path>) -> Result<String> {
    let device = escape(&device_path(name));
    let target = escape(target);
    Ok(match overlay {
        Some(overlay) => format!(
            "<disk type='file' device='disk'>\n  \
               <driver name='qemu' type='qcow2' cache='none' io='native' discard='unmap'/>\n  \
               <source file='{}'/>\n  \
               <backingStore type='block'>\n    \
                 <format type='raw'/>\n    \
                 <source dev='{device}'/>\n    \
                 <backingStore/>\n  \
               </backingStore>\n  \
               <target dev='{target}' bus='virtio'/>\n\
             </disk>\n",
            escape(&overlay.display().to_string())
        ),
        None => format!(
            "<disk type='block' device='disk'>\n  \
               <driver name='qemu' type='raw' cache='none' io='native'/>\n  \
               <source dev='{device}'/>\n  \
               <target dev='{target}' bus='virtio'/>\n  \
               <readonly/>\n\
             </disk>\n"
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disks_name_the_device_and_escape_paths() {
        let web = DeviceName::new("web").unwrap();
        let ro = disk_xml(&web, "vda", None).unwrap();
        assert!(ro.contains("<source dev='/dev/vmar/web'/>"), "{ro}");
        assert!(
            ro.contains("cache='none'") && ro.contains("<readonly/>"),
            "{ro}"
        );
        let overlay = disk_xml(&web, "vdb", Some(Path::new("/vm/a'b&c.qcow2"))).unwrap();
        assert!(
            overlay.contains("<source file='/vm/a&apos;b&amp;c.qcow2'/>"),
            "{overlay}"
        );
        assert!(overlay.contains("<backingStore type='block'>"), "{overlay}");
        assert!(!overlay.contains("<readonly/>"));
    }
}
