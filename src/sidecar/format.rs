//! The sidecar file format: pure encoding and decoding over `Write`/`Read`, no file system.
//!
//! Version 1, little-endian:
//!
//! ```text
//! header   magic "VMARDIGS" | version u32 = 1 | flags u32 (bit 0: keyed) | block size u32
//!          | reserved u32 | image size u64 | mtime ns i128 | ctime ns i128
//! segments gap varint | count varint | count x 32-byte BLAKE3 digests
//!          (gap zero blocks, then count non-zero blocks; count 0 ends the list and its gap
//!          reaches the last block)
//! trailer  non-zero blocks u64 | fingerprint 32 | seal 32
//! ```
//!
//! The seal is BLAKE3 over every byte before it: keyed with the fleet key when one is
//! configured (a MAC: only holders of the key can write a sidecar others accept), else in
//! key-derivation mode (a checksum: catches damage, not forgery). The fingerprint is the
//! image's ([`crate::records::Fingerprint`]) and must equal the one recomputed from the
//! digests. Zero blocks (holes or written zeros) cost a varint per run; a dense 2 GiB image
//! takes about 16 MiB.

use std::io::{Read, Write};

use crate::image::BLOCK_SIZE;
use crate::records::Fingerprint;
use crate::scan::Digest;
use crate::units::usize_of;

pub const MAGIC: &[u8; 8] = b"VMARDIGS";
pub const VERSION: u32 = 1;
const FLAG_KEYED: u32 = 1;
const HEADER_LEN: usize = 8 + 4 + 4 + 4 + 4 + 8 + 16 + 16;
/// Most digests in one segment: bounds what the encoder buffers and the decoder hands out.
pub const SEGMENT_BLOCKS: u64 = 4096;
const CHECKSUM_CONTEXT: &str = "vmar 2026 sidecar checksum v1";
const KEY_CONTEXT: &str = "vmar 2026 sidecar key v1";

/// How a sidecar is sealed.
#[derive(Clone, PartialEq, Eq)]
pub enum Seal {
    /// Unkeyed checksum: trust comes from who owns the file.
    Checksum,
    /// Keyed BLAKE3 MAC with a key derived from the fleet key file's bytes.
    Keyed([u8; 32]),
}

impl std::fmt::Debug for Seal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the key.
        f.write_str(match self {
            Seal::Checksum => "Checksum",
            Seal::Keyed(_) => "Keyed",
        })
    }
}

impl Seal {
    /// The key of a fleet key file's contents.
    pub fn from_key_material(material: &[u8]) -> Seal {
        Seal::Keyed(blake3::derive_key(KEY_CONTEXT, material))
    }

    fn hasher(&self) -> blake3::Hasher {
        match self {
            Seal::Checksum => blake3::Hasher::new_derive_key(CHECKSUM_CONTEXT),
            Seal::Keyed(key) => blake3::Hasher::new_keyed(key),
        }
    }

    fn keyed(&self) -> bool {
        matches!(self, Seal::Keyed(_))
    }
}

/// What a sidecar says about the image it describes: what must still hold for it to apply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub size: u64,
    pub mtime_ns: i128,
    pub ctime_ns: i128,
}

impl Header {
    pub fn blocks(&self) -> u64 {
        self.size.div_ceil(BLOCK_SIZE)
    }
}

/// Why bytes are not a sidecar this host accepts.
#[derive(Debug, PartialEq, Eq)]
pub enum DecodeError {
    /// Damaged, truncated or not a sidecar.
    Corrupt(String),
    /// Well formed, but sealed in a way this host does not trust (wrong key, keyed vs not).
    Untrusted(String),
    /// Reading failed.
    Io(String),
}

fn io_error(e: std::io::Error) -> DecodeError {
    if e.kind() == std::io::ErrorKind::UnexpectedEof {
        DecodeError::Corrupt("truncated".into())
    } else {
        DecodeError::Io(e.to_string())
    }
}

/// Writes a sidecar as the digests arrive, in block order; nothing grows with the image.
pub struct Encoder<W: Write> {
    out: W,
    hasher: blake3::Hasher,
    blocks: u64,
    /// First block not yet described.
    next: u64,
    /// The pending segment: its gap and digests.
    gap: u64,
    run: Vec<Digest>,
    nonzero: u64,
    fingerprint: Fingerprint,
}

impl<W: Write> Encoder<W> {
    pub fn new(mut out: W, header: &Header, seal: &Seal) -> std::io::Result<Encoder<W>> {
        let mut hasher = seal.hasher();
        let mut bytes = Vec::with_capacity(HEADER_LEN);
        bytes.extend_from_slice(MAGIC);
        bytes.extend_from_slice(&VERSION.to_le_bytes());
        let flags = if seal.keyed() { FLAG_KEYED } else { 0 };
        bytes.extend_from_slice(&flags.to_le_bytes());
        bytes.extend_from_slice(&u32::try_from(BLOCK_SIZE).unwrap_or(4096).to_le_bytes());
        bytes.extend_from_slice(&0u32.to_le_bytes());
        bytes.extend_from_slice(&header.size.to_le_bytes());
        bytes.extend_from_slice(&header.mtime_ns.to_le_bytes());
        bytes.extend_from_slice(&header.ctime_ns.to_le_bytes());
        hasher.update(&bytes);
        out.write_all(&bytes)?;
        Ok(Encoder {
            out,
            hasher,
            blocks: header.blocks(),
            next: 0,
            gap: 0,
            run: Vec::new(),
            nonzero: 0,
            fingerprint: Fingerprint::new(header.size),
        })
    }

    fn put(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.hasher.update(bytes);
        self.out.write_all(bytes)
    }

    fn flush_segment(&mut self) -> std::io::Result<()> {
        if self.run.is_empty() {
            return Ok(());
        }
        let mut head = Vec::with_capacity(20);
        put_varint(&mut head, self.gap);
        put_varint(&mut head, self.run.len() as u64);
        self.put(&head)?;
        let run = std::mem::take(&mut self.run);
        for digest in &run {
            self.put(digest)?;
        }
        self.run = run;
        self.run.clear();
        self.gap = 0;
        Ok(())
    }

    /// Adds non-zero blocks, in increasing block order, each below the image's block count.
    pub fn push(&mut self, records: &[(u64, Digest)]) -> std::io::Result<()> {
        for &(block, digest) in records {
            if block < self.next || block >= self.blocks {
                return Err(std::io::Error::other(format!(
                    "block {block} out of order or past the image (this is a bug)"
                )));
            }
            let extends = !self.run.is_empty() && block == self.next;
            if !extends || self.run.len() as u64 >= SEGMENT_BLOCKS {
                self.flush_segment()?;
                self.gap = block - self.next;
            }
            self.run.push(digest);
            self.fingerprint.push(block, &digest);
            self.nonzero += 1;
            self.next = block + 1;
        }
        Ok(())
    }

    /// Ends the sidecar: the last gap, the trailer and the seal. Returns the writer and the
    /// image's fingerprint.
    pub fn finish(mut self) -> std::io::Result<(W, String)> {
        self.flush_segment()?;
        let mut tail = Vec::with_capacity(20 + 8 + 32);
        put_varint(&mut tail, self.blocks - self.next);
        put_varint(&mut tail, 0);
        tail.extend_from_slice(&self.nonzero.to_le_bytes());
        tail.extend_from_slice(self.fingerprint.finish_bytes().as_bytes());
        self.put(&tail)?;
        let seal = self.hasher.finalize();
        self.out.write_all(seal.as_bytes())?;
        Ok((self.out, self.fingerprint.finish()))
    }
}

/// Bytes of one decoded record: block (u64 LE), then digest, as digest lists store them
/// (the daemon's `digests::RECORD`; its tests check the two agree).
pub const RECORD: usize = 8 + 32;

/// The block and digest of one decoded record (`record` is at least [`RECORD`] bytes).
pub fn decode_record(record: &[u8]) -> (u64, Digest) {
    let mut block = [0u8; 8];
    block.copy_from_slice(&record[..8]);
    let mut digest = [0u8; 32];
    digest.copy_from_slice(&record[8..RECORD]);
    (u64::from_le_bytes(block), digest)
}

/// Bytes the decoder reads from its input at a time: few reads, and the seal is hashed in
/// pieces large enough for BLAKE3's SIMD lanes.
const READ_BYTES: usize = 1 << 20;

/// Reads a sidecar as a stream of records, checking its seal at the end. Nothing it hands
/// out may be used before [`Decoder::next_batch`] returned `Ok(false)`: only then is the
/// whole file known to be intact and trusted.
///
/// Records come out as digest lists store them ([`RECORD`]: block u64 LE, then the
/// digest, 40 bytes each), which is also what the image's fingerprint hashes: a batch is
/// hashed into the fingerprint in one update and can be written to the image's digest list
/// as it is, with no per-block work beyond laying the bytes out.
pub struct Decoder<R: Read> {
    input: R,
    hasher: blake3::Hasher,
    header: Header,
    blocks: u64,
    next: u64,
    nonzero: u64,
    fingerprint: Fingerprint,
    done: bool,
    /// Bytes read: `buf[pos..end]` is not consumed yet, `buf[..hashed]` is in the seal's
    /// hash.
    buf: Vec<u8>,
    pos: usize,
    end: usize,
    hashed: usize,
}

impl<R: Read> Decoder<R> {
    /// Reads the header: refuses what is not a version-1 sidecar sealed the way `seal` is.
    pub fn new(mut input: R, seal: &Seal) -> Result<Decoder<R>, DecodeError> {
        let mut bytes = [0u8; HEADER_LEN];
        input.read_exact(&mut bytes).map_err(io_error)?;
        if &bytes[..8] != MAGIC {
            return Err(DecodeError::Corrupt(
                "not a vmar sidecar (bad magic)".into(),
            ));
        }
        let u32_at = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap_or([0; 4]));
        let version = u32_at(8);
        if version != VERSION {
            return Err(DecodeError::Corrupt(format!(
                "sidecar version {version}; this vmar reads {VERSION}"
            )));
        }
        let flags = u32_at(12);
        if flags & !FLAG_KEYED != 0 {
            return Err(DecodeError::Corrupt(format!("unknown flags {flags:#x}")));
        }
        match (flags & FLAG_KEYED != 0, seal.keyed()) {
            (true, false) => {
                return Err(DecodeError::Untrusted(
                    "sealed with a fleet key, and this host has none (set sidecar_key)".into(),
                ));
            }
            (false, true) => {
                return Err(DecodeError::Untrusted(
                    "not sealed with a fleet key, and this host requires one".into(),
                ));
            }
            _ => {}
        }
        if u64::from(u32_at(16)) != BLOCK_SIZE || u32_at(20) != 0 {
            return Err(DecodeError::Corrupt("unsupported block size".into()));
        }
        let size = u64::from_le_bytes(bytes[24..32].try_into().unwrap_or([0; 8]));
        let mtime_ns = i128::from_le_bytes(bytes[32..48].try_into().unwrap_or([0; 16]));
        let ctime_ns = i128::from_le_bytes(bytes[48..64].try_into().unwrap_or([0; 16]));
        let header = Header {
            size,
            mtime_ns,
            ctime_ns,
        };
        let mut hasher = seal.hasher();
        hasher.update(&bytes);
        Ok(Decoder {
            input,
            hasher,
            header,
            blocks: header.blocks(),
            next: 0,
            nonzero: 0,
            fingerprint: Fingerprint::new(size),
            done: false,
            buf: Vec::new(),
            pos: 0,
            end: 0,
            hashed: 0,
        })
    }

    pub fn header(&self) -> &Header {
        &self.header
    }

    /// Makes at least `len` unconsumed bytes available (`Corrupt("truncated")` at the end
    /// of the input). Consumed bytes are hashed into the seal before they are dropped. The
    /// buffer grows from a few KiB to [`READ_BYTES`] as the input proves long (it is
    /// zero-filled once as it grows, not at every read).
    fn fill(&mut self, len: usize) -> Result<(), DecodeError> {
        if self.end - self.pos >= len {
            return Ok(());
        }
        self.hasher.update(&self.buf[self.hashed..self.pos]);
        self.buf.copy_within(self.pos..self.end, 0);
        self.end -= self.pos;
        self.pos = 0;
        self.hashed = 0;
        let grown = (self.buf.len() * 2).clamp(16 << 10, READ_BYTES);
        if self.buf.len() < grown.max(len) {
            self.buf.resize(grown.max(len), 0);
        }
        while self.end < len {
            match self.input.read(&mut self.buf[self.end..]) {
                Ok(0) => return Err(DecodeError::Corrupt("truncated".into())),
                Ok(n) => self.end += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(io_error(e)),
            }
        }
        Ok(())
    }

    /// The next `len` bytes (they count towards the seal).
    fn take(&mut self, len: usize) -> Result<&[u8], DecodeError> {
        self.fill(len)?;
        let at = self.pos;
        self.pos += len;
        Ok(&self.buf[at..self.pos])
    }

    fn varint(&mut self) -> Result<u64, DecodeError> {
        let mut value: u64 = 0;
        for shift in (0..64).step_by(7) {
            let byte = self.take(1)?[0];
            let bits = u64::from(byte & 0x7f);
            if shift == 63 && bits > 1 {
                break;
            }
            value |= bits << shift;
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(DecodeError::Corrupt("bad varint".into()))
    }

    /// Appends the records of the next segments to `out` (block u64 LE, digest: 40 bytes
    /// each), at least `records` of them unless the list ends first. `Ok(false)` once the
    /// trailer is read and the seal, counts and fingerprint all check out (nothing is
    /// appended then).
    pub fn next_batch(&mut self, out: &mut Vec<u8>, records: usize) -> Result<bool, DecodeError> {
        if self.done {
            return Ok(false);
        }
        let from = out.len();
        let mut added = 0;
        while added < records.max(1) {
            let gap = self.varint()?;
            let count = self.varint()?;
            let start = self
                .next
                .checked_add(gap)
                .filter(|&s| s <= self.blocks)
                .ok_or_else(|| DecodeError::Corrupt("a gap runs past the image".into()))?;
            if count == 0 {
                if start != self.blocks {
                    return Err(DecodeError::Corrupt(
                        "the segments do not cover the image".into(),
                    ));
                }
                self.next = start;
                self.fingerprint.push_encoded(&out[from..]);
                self.finish()?;
                return Ok(added > 0);
            }
            if count > SEGMENT_BLOCKS || count > self.blocks - start {
                return Err(DecodeError::Corrupt("a segment runs past the image".into()));
            }
            let n = usize_of(count);
            let digests = self.take(n * 32)?;
            out.reserve(n * RECORD);
            for (block, digest) in (start..).zip(digests.chunks_exact(32)) {
                out.extend_from_slice(&block.to_le_bytes());
                out.extend_from_slice(digest);
            }
            self.nonzero += count;
            self.next = start + count;
            added += n;
        }
        // One update for the whole batch: BLAKE3 hashes long inputs many chunks at a time.
        self.fingerprint.push_encoded(&out[from..]);
        Ok(true)
    }

    fn finish(&mut self) -> Result<(), DecodeError> {
        let mut tail = [0u8; 8 + 32];
        tail.copy_from_slice(self.take(8 + 32)?);
        // The seal is not part of what it seals.
        self.hasher.update(&self.buf[self.hashed..self.pos]);
        self.hashed = self.pos;
        let mut seal = [0u8; 32];
        seal.copy_from_slice(self.take(32)?);
        if self.pos < self.end {
            return Err(DecodeError::Corrupt("bytes after the seal".into()));
        }
        let mut extra = [0u8; 1];
        loop {
            match self.input.read(&mut extra) {
                Ok(0) => break,
                Ok(_) => return Err(DecodeError::Corrupt("bytes after the seal".into())),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(io_error(e)),
            }
        }
        // Constant-time comparison (blake3's Hash equality).
        if self.hasher.finalize() != blake3::Hash::from_bytes(seal) {
            return Err(DecodeError::Untrusted(
                "the seal does not match (damaged, or written without this fleet key)".into(),
            ));
        }
        let nonzero = u64::from_le_bytes(tail[..8].try_into().unwrap_or([0; 8]));
        if nonzero != self.nonzero {
            return Err(DecodeError::Corrupt("non-zero block count differs".into()));
        }
        if tail[8..] != *self.fingerprint.finish_bytes().as_bytes() {
            return Err(DecodeError::Corrupt(
                "fingerprint differs from its digests".into(),
            ));
        }
        self.done = true;
        Ok(())
    }

    /// The image's fingerprint; only meaningful once every segment was read.
    pub fn fingerprint(&self) -> String {
        self.fingerprint.finish()
    }

    pub fn nonzero(&self) -> u64 {
        self.nonzero
    }
}

fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    loop {
        let byte = (value & 0x7f) as u8;
        value >>= 7;
        if value == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(blocks: u64) -> Header {
        Header {
            size: blocks * BLOCK_SIZE - 512,
            mtime_ns: 1_700_000_000_123_456_789,
            ctime_ns: 1_700_000_001_000_000_000,
        }
    }

    fn records(blocks: u64) -> Vec<(u64, Digest)> {
        // Runs of every length, gaps at the start and end, a run longer than a segment.
        (0..blocks)
            .filter(|b| (b % 7 != 0 && b % 11 != 3) || (5000..9500).contains(b))
            .filter(|b| *b > 2 && *b + 2 < blocks)
            .map(|b| (b, *blake3::hash(&b.to_le_bytes()).as_bytes()))
            .collect()
    }

    fn encode(header: &Header, records: &[(u64, Digest)], seal: &Seal) -> (Vec<u8>, String) {
        let mut encoder = Encoder::new(Vec::new(), header, seal).unwrap();
        for chunk in records.chunks(1000) {
            encoder.push(chunk).unwrap();
        }
        encoder.finish().unwrap()
    }

    type Decoded = (Header, Vec<(u64, Digest)>, String);

    fn records_of(bytes: &[u8]) -> Vec<(u64, Digest)> {
        bytes
            .chunks_exact(RECORD)
            .map(|r| {
                let block = u64::from_le_bytes(r[..8].try_into().unwrap());
                (block, r[8..].try_into().unwrap())
            })
            .collect()
    }

    /// Decodes in batches of `batch` records at least.
    fn decode_by(bytes: impl Read, seal: &Seal, batch: usize) -> Result<Decoded, DecodeError> {
        let mut decoder = Decoder::new(bytes, seal)?;
        let mut all = Vec::new();
        let mut out = Vec::new();
        while decoder.next_batch(&mut out, batch)? {
            assert!(!out.is_empty());
            assert_eq!(out.len() % RECORD, 0);
            all.extend(records_of(&out));
            out.clear();
        }
        assert!(out.is_empty(), "nothing comes with the end");
        assert!(
            !decoder.next_batch(&mut out, batch)?,
            "the end stays the end"
        );
        Ok((*decoder.header(), all, decoder.fingerprint()))
    }

    fn decode(bytes: &[u8], seal: &Seal) -> Result<Decoded, DecodeError> {
        decode_by(bytes, seal, 1)
    }

    #[test]
    fn round_trip_gives_the_digests_and_the_fingerprint() {
        let head = header(12_000);
        let records = records(12_000);
        for seal in [Seal::Checksum, Seal::from_key_material(b"fleet key")] {
            let (bytes, fingerprint) = encode(&head, &records, &seal);
            assert_eq!(
                fingerprint,
                crate::records::fingerprint(head.size, &records)
            );
            // Batches of one segment, of a few, and of everything at once.
            for batch in [1, 5000, usize::MAX] {
                let (h, decoded, f) = decode_by(bytes.as_slice(), &seal, batch).unwrap();
                assert_eq!(h, head);
                assert_eq!(decoded, records);
                assert_eq!(f, fingerprint);
            }
            // Compact: 32 bytes a non-zero block and little else.
            assert!(bytes.len() < records.len() * 32 + 4096, "{}", bytes.len());
        }
        // An image of zero blocks only, and an image with no zero block.
        let small = header(10);
        for records in [
            Vec::new(),
            (0..10u8).map(|b| (u64::from(b), [b + 1; 32])).collect(),
        ] {
            let (bytes, _) = encode(&small, &records, &Seal::Checksum);
            assert_eq!(decode(&bytes, &Seal::Checksum).unwrap().1, records);
        }
    }

    /// Hands out at most 7 bytes a read, and is interrupted at every third call.
    struct Trickle<'a> {
        bytes: &'a [u8],
        calls: usize,
    }

    impl Read for Trickle<'_> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            self.calls += 1;
            if self.calls.is_multiple_of(3) {
                return Err(std::io::ErrorKind::Interrupted.into());
            }
            let n = buf.len().min(7).min(self.bytes.len());
            buf[..n].copy_from_slice(&self.bytes[..n]);
            self.bytes = &self.bytes[n..];
            Ok(n)
        }
    }

    #[test]
    fn short_and_interrupted_reads_decode_the_same() {
        let head = header(9_000);
        let records = records(9_000);
        let seal = Seal::from_key_material(b"fleet key");
        let (bytes, fingerprint) = encode(&head, &records, &seal);
        let trickle = Trickle {
            bytes: &bytes,
            calls: 0,
        };
        let (h, decoded, f) = decode_by(trickle, &seal, 3000).unwrap();
        assert_eq!((h, f), (head, fingerprint));
        assert_eq!(decoded, records);
        // Cut short, through the same reads: refused.
        let cut = Trickle {
            bytes: &bytes[..bytes.len() - 1],
            calls: 0,
        };
        assert_eq!(
            decode_by(cut, &seal, 3000).unwrap_err(),
            DecodeError::Corrupt("truncated".into())
        );
    }

    #[test]
    fn every_damage_is_refused() {
        let header = header(300);
        let records = records(300);
        let key = Seal::from_key_material(b"fleet key");
        let (bytes, _) = encode(&header, &records, &key);
        // Every single flipped byte, and every truncation, is refused.
        for at in 0..bytes.len() {
            let mut damaged = bytes.clone();
            damaged[at] ^= 0x40;
            assert!(decode(&damaged, &key).is_err(), "flip at {at}");
        }
        for len in 0..bytes.len() {
            assert!(decode(&bytes[..len], &key).is_err(), "truncated to {len}");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(decode(&longer, &key).is_err());
        // Another key, or none, is refused as untrusted.
        let other = Seal::from_key_material(b"another key");
        assert!(matches!(
            decode(&bytes, &other),
            Err(DecodeError::Untrusted(_))
        ));
        assert!(matches!(
            decode(&bytes, &Seal::Checksum),
            Err(DecodeError::Untrusted(_))
        ));
        let (plain, _) = encode(&header, &records, &Seal::Checksum);
        assert!(matches!(
            decode(&plain, &key),
            Err(DecodeError::Untrusted(_))
        ));
    }

    #[test]
    fn a_forged_sidecar_with_a_recomputed_checksum_is_caught_only_by_the_key() {
        // Without a key the seal is a checksum anyone can recompute: trust then rests on who
        // owns the file. With a key, a forger without it cannot make a valid seal.
        let header = header(50);
        let mut records = records(50);
        records[3].1[0] ^= 1;
        let (forged, _) = encode(&header, &records, &Seal::Checksum);
        assert!(decode(&forged, &Seal::Checksum).is_ok());
        let key = Seal::from_key_material(b"fleet key");
        assert!(decode(&forged, &key).is_err());
    }

    #[test]
    fn varints_round_trip() {
        for value in [0, 1, 127, 128, 300, u64::from(u32::MAX), u64::MAX] {
            let mut bytes = Vec::new();
            put_varint(&mut bytes, value);
            let mut decoder = Decoder {
                input: bytes.as_slice(),
                hasher: blake3::Hasher::new(),
                header: header(1),
                blocks: 1,
                next: 0,
                nonzero: 0,
                fingerprint: Fingerprint::new(0),
                done: false,
                buf: Vec::new(),
                pos: 0,
                end: 0,
                hashed: 0,
            };
            assert_eq!(decoder.varint().unwrap(), value);
        }
    }
}
