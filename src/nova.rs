//! OpenStack Nova's image cache (`/var/lib/nova/instances/_base`) holds, beside the images
//! it downloaded (named by the SHA-1 of the image id: 40 hex characters), files it made
//! itself that are no images to share: swap (`swap_512`), formatted ephemeral disks
//! (`ephemeral_1_0706d66`, `ephemeral_20_default`) and copies of a base resized for a flavor
//! (`HASH_10`, the size in GiB). Auto-capture leaves those alone: they are written in place
//! while instances use them, and capturing them would only fill the catalog.

use std::ffi::OsStr;

/// Why a file name in an image root is one of Nova's own files, or `None`.
pub fn not_an_image(name: &OsStr) -> Option<&'static str> {
    let name = name.to_str()?;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if name.strip_prefix("swap_").is_some_and(digits) {
        return Some("Nova's swap disk (swap_<MiB>), not an image");
    }
    if let Some(rest) = name.strip_prefix("ephemeral_")
        && let Some((size, tag)) = rest.split_once('_')
        && digits(size)
        && !tag.is_empty()
        && tag.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    {
        return Some("Nova's ephemeral disk (ephemeral_<GiB>_<fs>), not an image");
    }
    if let Some((hash, size)) = name.split_once('_')
        && hash.len() == 40
        && hash.bytes().all(|b| b.is_ascii_hexdigit())
        && digits(size)
    {
        return Some("Nova's resized copy of a base image (<hash>_<GiB>); the base is captured");
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn novas_own_files_are_not_images() {
        let hash = "0123456789abcdef0123456789abcdef01234567";
        for name in [
            "swap_512".to_string(),
            "ephemeral_1_0706d66".into(),
            "ephemeral_20_default".into(),
            format!("{hash}_10"),
        ] {
            assert!(not_an_image(OsStr::new(&name)).is_some(), "{name}");
        }
        for name in [
            hash.to_string(),
            "swap_x".into(),
            "swap_".into(),
            "ephemeral_1".into(),
            format!("{hash}_big"),
            "web_10".into(),
            "web.raw".into(),
        ] {
            assert!(not_an_image(OsStr::new(&name)).is_none(), "{name}");
        }
    }
}
