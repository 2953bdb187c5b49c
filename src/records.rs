//! The catalog's records and how they are stored: image and device records (JSON), block
//! digests and map extents (fixed-size binary records in chunks). Pure encoding, no I/O;
//! [`crate::catalog`] keeps them in redb. Also where a captured image's file stands
//! (`ImageFileState`, worked out by [`crate::holds`]), which `images` reports beside the record.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::image::ImageIdentity;
use crate::map::{Extent, ImageId, MapSummary, Source};
use crate::scan::{Digest, ScanStats};

/// Where a captured image's file stands, and what keeps it (see [`crate::holds`]).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageFileState {
    /// `present`: its path names the captured file; `gone`: deleted, renamed, or the path
    /// names another file now.
    pub state: String,
    /// vmar's hold on the captured file (a hard link in the state directory), if any.
    pub hold: Option<PathBuf>,
    /// Why there is no hold.
    pub not_held: Option<String>,
    pub kept_by: KeptBy,
}

/// What needs an image: saved devices that read it, images whose maps redirect into it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeptBy {
    pub devices: Vec<String>,
    pub images: Vec<String>,
}

const DIGEST_RECORD: usize = 8 + 32;
const EXTENT_RECORD: usize = 8 + 8 + 1 + 4 + 8;

/// A captured image as the catalog knows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRecord {
    pub id: ImageId,
    pub name: String,
    pub path: PathBuf,
    pub size: u64,
    pub identity: ImageIdentity,
    /// Seconds since the epoch.
    pub captured_at: u64,
    pub scan: ScanStats,
    pub summary: MapSummary,
    /// Content fingerprint ([`fingerprint`]); `None` in records from before fingerprints.
    #[serde(default)]
    pub fingerprint: Option<String>,
}

/// Fingerprint of an image's content: BLAKE3 (in its key-derivation mode, so it cannot be
/// mistaken for a file digest) over the size and every (block number, block digest) of the
/// non-zero blocks in order. Two hosts that print the same fingerprint for a name serve the
/// same bytes under it, whatever the paths, capture order or maps.
pub fn fingerprint(size: u64, digests: &[(u64, Digest)]) -> String {
    let mut fingerprint = Fingerprint::new(size);
    for (block, digest) in digests {
        fingerprint.push(*block, digest);
    }
    fingerprint.finish()
}

/// [`fingerprint`] computed as the digests arrive, so they need not be kept.
pub struct Fingerprint(blake3::Hasher);

impl Fingerprint {
    pub fn new(size: u64) -> Fingerprint {
        let mut hasher = blake3::Hasher::new_derive_key("vmar 2026 image fingerprint v1");
        hasher.update(&size.to_le_bytes());
        Fingerprint(hasher)
    }

    pub fn push(&mut self, block: u64, digest: &Digest) {
        self.0.update(&block.to_le_bytes());
        self.0.update(digest);
    }

    /// [`Fingerprint::push`] of records encoded as digest lists store them (block u64 LE,
    /// then digest; [`crate::digests`]): the same bytes in one update.
    pub fn push_encoded(&mut self, records: &[u8]) {
        self.0.update(records);
    }

    pub fn finish(&self) -> String {
        format!("blake3:{}", self.finish_bytes().to_hex())
    }

    /// The fingerprint as a hash, for binary formats ([`crate::sidecar`]).
    pub fn finish_bytes(&self) -> blake3::Hash {
        self.0.finalize()
    }
}

/// A device vmard should serve: saved before it is created, marked before it is removed,
/// restored at boot. The record is the one truth about a device name: after a crash at any
/// step, start-up makes the kernel agree with it (see [`DeviceState`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceRecord {
    pub name: String,
    /// Name of the captured image it serves.
    pub image: String,
    /// Seconds since the epoch.
    pub created_at: u64,
    #[serde(default)]
    pub state: DeviceState,
    /// Images found changed under it (state `image-changed`), so that the verdict survives
    /// restarts and reboots, which a block device's write counters do not.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub changed: Vec<String>,
}

/// Where a device is in its life. A crash leaves a record in the state of the step it
/// interrupted, and start-up finishes or undoes that step.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DeviceState {
    /// Saved, not yet (or not known to be) live: start-up undoes it unless it is open.
    Creating,
    /// Serve it.
    #[default]
    Active,
    /// Live, but an image it reads changed since capture (written in place, truncated):
    /// served as the policy says (by default its extents fail with EIO), never silently.
    /// `refresh` makes it active again once its images are unchanged.
    ImageChanged,
    /// Being removed: start-up removes it.
    Removing,
    /// Removal deferred to its last close: the record goes once the device is gone.
    RemovingDeferred,
}

/// The content a device name served: kept when the device is removed, so that the name
/// cannot silently come back over other bytes (an overlay or a domain that names
/// `/dev/vmar/NAME` would read them as its backing disk). Re-binding a name is explicit.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NameBinding {
    /// Device name.
    pub name: String,
    /// Name of the image it served.
    pub image: String,
    /// That image's content fingerprint (`None` for images captured before fingerprints).
    pub fingerprint: Option<String>,
    /// Seconds since the epoch.
    pub bound_at: u64,
}

/// What a capture request did.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CaptureStatus {
    Captured,
    /// Same identity as already captured: nothing was read.
    Unchanged,
    Recaptured,
}

pub fn encode_digests(digests: &[(u64, Digest)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(digests.len() * DIGEST_RECORD);
    for (block, digest) in digests {
        out.extend_from_slice(&block.to_le_bytes());
        out.extend_from_slice(digest);
    }
    out
}

pub fn decode_digests(bytes: &[u8]) -> Result<Vec<(u64, Digest)>, String> {
    if !bytes.len().is_multiple_of(DIGEST_RECORD) {
        return Err(format!("digest chunk of {} bytes", bytes.len()));
    }
    Ok(bytes
        .chunks_exact(DIGEST_RECORD)
        .map(|r| {
            let (block, digest) = r.split_at(8);
            (le_u64(block), digest.try_into().unwrap_or([0; 32]))
        })
        .collect())
}

fn le_u64(bytes: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&bytes[..8]);
    u64::from_le_bytes(b)
}

pub fn encode_extents(extents: &[Extent]) -> Vec<u8> {
    let mut out = Vec::with_capacity(extents.len() * EXTENT_RECORD);
    for e in extents {
        let (kind, image, block) = match e.source {
            Source::Zero => (0u8, 0u32, 0u64),
            Source::Own => (1, 0, 0),
            Source::Redirect { image, block } => (2, image, block),
        };
        out.extend_from_slice(&e.start.to_le_bytes());
        out.extend_from_slice(&e.len.to_le_bytes());
        out.push(kind);
        out.extend_from_slice(&image.to_le_bytes());
        out.extend_from_slice(&block.to_le_bytes());
    }
    out
}

pub fn decode_extents(bytes: &[u8]) -> Result<Vec<Extent>, String> {
    if !bytes.len().is_multiple_of(EXTENT_RECORD) {
        return Err(format!("extent chunk of {} bytes", bytes.len()));
    }
    bytes
        .chunks_exact(EXTENT_RECORD)
        .map(|r| {
            let mut image = [0u8; 4];
            image.copy_from_slice(&r[17..21]);
            let image = u32::from_le_bytes(image);
            let block = le_u64(&r[21..29]);
            let source = match r[16] {
                0 => Source::Zero,
                1 => Source::Own,
                2 => Source::Redirect { image, block },
                other => return Err(format!("extent kind {other}")),
            };
            Ok(Extent {
                start: le_u64(&r[0..8]),
                len: le_u64(&r[8..16]),
                source,
            })
        })
        .collect()
}

/// Bytes of checksum after every value the catalog stores.
const SEAL_BYTES: usize = 16;

/// `payload` followed by the first 16 bytes of its blake3: how the catalog stores every
/// record, so that a damaged one is refused instead of decoded into wrong maps.
pub fn seal(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + SEAL_BYTES);
    out.extend_from_slice(payload);
    out.extend_from_slice(&blake3::hash(payload).as_bytes()[..SEAL_BYTES]);
    out
}

/// The payload of a sealed value, if its checksum holds.
pub fn unseal(value: &[u8]) -> Result<&[u8], String> {
    let Some(split) = value.len().checked_sub(SEAL_BYTES) else {
        return Err(format!("record of {} bytes is too short", value.len()));
    };
    let (payload, sum) = value.split_at(split);
    if blake3::hash(payload).as_bytes()[..SEAL_BYTES] != *sum {
        return Err("record checksum mismatch".into());
    }
    Ok(payload)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip() {
        let digests = vec![(0u64, [1u8; 32]), (u64::MAX, [255u8; 32])];
        assert_eq!(decode_digests(&encode_digests(&digests)).unwrap(), digests);
        let extents = vec![
            Extent {
                start: 0,
                len: 5,
                source: Source::Zero,
            },
            Extent {
                start: 5,
                len: 1,
                source: Source::Own,
            },
            Extent {
                start: 6,
                len: u64::MAX - 6,
                source: Source::Redirect {
                    image: u32::MAX,
                    block: 1 << 40,
                },
            },
        ];
        assert_eq!(decode_extents(&encode_extents(&extents)).unwrap(), extents);
        assert!(decode_digests(&[0u8; 41]).is_err());
        assert!(decode_extents(&[0u8; 30]).is_err());
        let mut bad = encode_extents(&extents[..1]);
        bad[16] = 9;
        assert!(decode_extents(&bad).is_err());
    }

    #[test]
    fn sealed_values_round_trip_and_damage_is_found() {
        let value = seal(b"{\"name\":\"web\"}");
        assert_eq!(unseal(&value).unwrap(), b"{\"name\":\"web\"}");
        for i in 0..value.len() {
            let mut bad = value.clone();
            bad[i] ^= 0x10;
            assert!(unseal(&bad).is_err(), "flip at {i} not found");
        }
        assert!(unseal(&value[..10]).is_err());
        assert_eq!(unseal(&seal(b"")).unwrap(), b"");
    }
}
