//! Fuzz targets for everything vmard parses from outside: request lines from the socket, the
//! catalog's record decoders, table lines and dm-stats output from the kernel, the backup.
//!
//! A small mutation fuzzer on stable Rust (cargo-fuzz needs nightly, which this project does
//! not require): each target starts from valid seeds and applies random bit flips, byte
//! changes, cuts, duplications and splices for `VMAR_FUZZ_SECONDS` (default 3) seconds. A
//! target fails if a parser panics, or if something it accepts does not survive a round trip
//! through its own encoding. `tools/test` runs each target for longer.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::time::{Duration, Instant};

use vmar::map::{Extent, Source};
use vmar::records::{decode_digests, decode_extents, encode_digests, encode_extents};
use vmar::table::Target;

/// xorshift64*: reproducible, seeded per target.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        usize::try_from(self.next() % (n.max(1) as u64)).unwrap()
    }
}

const INTERESTING: &[&[u8]] = &[
    b"\0",
    b"\xff",
    b"\n",
    b"\"",
    b"{",
    b"}",
    b"[",
    b"]",
    b":",
    b",",
    b"-1",
    b"0",
    b"18446744073709551615",
    b"18446744073709551616",
    b"1e999",
    b"null",
    b"true",
    b"\\u0000",
    b"\xf0\x9f\x92\xa9",
    b"/",
    b"..",
    b"op",
    b"\"op\":\"create\"",
    b"linear",
    b"zero",
    b"+",
];

fn mutate(rng: &mut Rng, seeds: &[Vec<u8>]) -> Vec<u8> {
    let mut data = seeds[rng.below(seeds.len())].clone();
    for _ in 0..=rng.below(8) {
        let at = rng.below(data.len() + 1);
        match rng.below(7) {
            0 if !data.is_empty() => {
                let i = rng.below(data.len());
                data[i] ^= 1 << rng.below(8);
            }
            1 if !data.is_empty() => {
                let i = rng.below(data.len());
                data[i] = u8::try_from(rng.below(256)).unwrap();
            }
            2 => data.truncate(at),
            3 => {
                let piece = INTERESTING[rng.below(INTERESTING.len())];
                data.splice(at..at, piece.iter().copied());
            }
            4 if !data.is_empty() => {
                let end = (at + rng.below(64)).min(data.len());
                let copy = data[at.min(end)..end].to_vec();
                data.splice(at..at, copy);
            }
            5 => {
                let other = &seeds[rng.below(seeds.len())];
                let from = rng.below(other.len() + 1);
                data.splice(at..at, other[from..].iter().copied());
            }
            _ => {
                let end = (at + rng.below(16)).min(data.len());
                data.drain(at..end);
            }
        }
    }
    data
}

/// Runs `check` on mutated inputs until the time budget is spent; fails with the input that
/// made it panic.
fn fuzz(name: &str, seed: u64, seeds: Vec<Vec<u8>>, check: impl Fn(&[u8])) {
    let seconds = std::env::var("VMAR_FUZZ_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut rng = Rng(seed);
    let mut runs = 0u64;
    for input in &seeds {
        check(input);
    }
    while Instant::now() < deadline {
        for _ in 0..256 {
            let input = mutate(&mut rng, &seeds);
            if catch_unwind(AssertUnwindSafe(|| check(&input))).is_err() {
                panic!(
                    "{name}: panicked on input {:?}",
                    String::from_utf8_lossy(&input)
                );
            }
            runs += 1;
        }
    }
    eprintln!("{name}: {runs} inputs in {seconds} s");
    assert!(runs > 0 || seconds == 0);
}

#[test]
fn fuzz_request_lines() {
    let seeds = [
        r#"{"op":"ping"}"#,
        r#"{"op":"capture","path":"/images/web.raw","name":null,"recapture":false}"#,
        r#"{"op":"create","name":"web","image":"/images/web.raw","capture":true,"force_raw":false}"#,
        r#"{"op":"remove","name":"web","deferred":true}"#,
        r#"{"op":"table","name":"web","devices":{"base":"7:0","web":"/dev/loop1"}}"#,
        r#"{"op":"stats","name":null}"#,
        r#"{"op":"status","name":"web","table":true}"#,
    ];
    let seeds = seeds.iter().map(|s| s.as_bytes().to_vec()).collect();
    fuzz("request", 1, seeds, |input| {
        let line = String::from_utf8_lossy(input);
        if let Ok(request) = vmar::server::parse_request(&line) {
            let again = serde_json::to_string(&request).unwrap();
            assert_eq!(vmar::server::parse_request(&again).unwrap(), request);
        }
    });
}

#[test]
fn fuzz_record_decoders() {
    let digests = encode_digests(&[(0, [1; 32]), (7, [2; 32]), (u64::MAX, [0xff; 32])]);
    let extents = encode_extents(&[
        Extent {
            start: 0,
            len: 3,
            source: Source::Zero,
        },
        Extent {
            start: 3,
            len: 1,
            source: Source::Own,
        },
        Extent {
            start: 4,
            len: 9,
            source: Source::Redirect {
                image: 2,
                block: 40,
            },
        },
    ]);
    fuzz("records", 2, vec![digests, extents], |input| {
        if let Ok(d) = decode_digests(input) {
            assert_eq!(encode_digests(&d), input);
        }
        if let Ok(e) = decode_extents(input) {
            assert_eq!(decode_extents(&encode_extents(&e)).unwrap(), e);
        }
    });
}

#[test]
fn fuzz_table_lines_and_dm_stats() {
    let seeds = [
        "0 16 linear 7:0 0\n16 8 zero\n",
        "24 8 linear /dev/loop1 40\n32 8 error\n",
        "0: 0+6291456 1536 vmar -\n1: 0+8 8 other aux\n",
        "0+1536 12 0 96 4 0 0 0 0 0 0 4 0 0\n1536+1536 0 0 0 0 0 0 0 0 0 0 0 0 0\n",
    ];
    let seeds = seeds.iter().map(|s| s.as_bytes().to_vec()).collect();
    fuzz("kernel-text", 3, seeds, |input| {
        let text = String::from_utf8_lossy(input);
        if let Ok(table) = vmar::table::from_text(&text) {
            assert_eq!(
                vmar::table::from_text(&vmar::table::to_text(&table)).unwrap(),
                table
            );
        }
        for line in text.lines() {
            let _ = line.parse::<Target>();
        }
        let _ = vmar::kernel::dmstats::parse_stats_list(&text);
        let _ = vmar::kernel::dmstats::parse_stats_print(&text);
    });
}

#[test]
fn fuzz_backup_and_config() {
    let dir = tempfile::tempdir().unwrap();
    vmar::backup::write(dir.path(), &vmar::backup::Backup::default()).unwrap();
    let backup = std::fs::read(dir.path().join(vmar::backup::BACKUP_FILE)).unwrap();
    let config =
        b"image_roots = [\"/var/lib/vmar/images\"]\nmax_targets = 100\nsocket_group = \"vmar\"\n"
            .to_vec();
    let path = dir.path().join(vmar::backup::BACKUP_FILE);
    let config_path = dir.path().join("vmar.toml");
    fuzz("backup-config", 4, vec![backup, config], |input| {
        std::fs::write(&path, input).unwrap();
        let _ = vmar::backup::read(dir.path());
        std::fs::write(&config_path, input).unwrap();
        let _ = vmar::config::Config::load(&config_path, true);
    });
}
