//! Single-core hashing speed of 4 KiB blocks, in memory: each `vmar::hash` backend against
//! `blake3::hash` of every block (what capture did before) and against `blake3::hash` of the
//! whole buffer at once (BLAKE3's own full-width SIMD, one thread: the ceiling). Prints the
//! median of the runs and ratios to the whole-buffer figure measured in the same run.
//!
//!     cargo run --release --example bench-hash [MIB] [RUNS]

use std::time::Instant;

use vmar::hash::{BLOCK, Backend, hash_blocks_with};

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

fn main() {
    let mut args = std::env::args().skip(1);
    let mib: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(256);
    let runs: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(7);
    let mut data = vec![0u8; mib << 20];
    let mut x = 0x9E3779B97F4A7C15u64;
    for word in data.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        word.copy_from_slice(&x.to_le_bytes());
    }
    let blocks: Vec<&[u8; BLOCK]> = data
        .chunks_exact(BLOCK)
        .map(|b| b.try_into().expect("4 KiB"))
        .collect();
    let mut out = vec![[0u8; 32]; blocks.len()];
    let gib = data.len() as f64 / (1u64 << 30) as f64;
    let time = |f: &mut dyn FnMut()| -> f64 {
        f();
        median(
            (0..runs)
                .map(|_| {
                    let start = Instant::now();
                    f();
                    start.elapsed().as_secs_f64()
                })
                .collect(),
        )
    };
    let whole = time(&mut || {
        std::hint::black_box(blake3::hash(&data));
    });
    println!("{mib} MiB in memory, one thread, median of {runs} runs");
    println!(
        "{:<36} {:>8} {:>8} {:>14}",
        "method", "s", "GiB/s", "vs whole-file"
    );
    let row = |name: &str, s: f64| {
        println!("{name:<36} {s:>8.4} {:>8.2} {:>14.2}", gib / s, whole / s);
    };
    row("blake3::hash(whole buffer)", whole);
    let per_block = time(&mut || {
        for (b, o) in blocks.iter().zip(out.iter_mut()) {
            *o = *blake3::hash(&b[..]).as_bytes();
        }
    });
    row("blake3::hash(each 4 KiB block)", per_block);
    for backend in Backend::available() {
        let s = time(&mut || hash_blocks_with(backend, &blocks, &mut out));
        row(
            &format!("vmar::hash {backend:?} ({} lanes)", backend.lanes()),
            s,
        );
    }
}
