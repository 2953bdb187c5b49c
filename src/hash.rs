//! BLAKE3 of many 4 KiB blocks at once, one block per SIMD lane.
//!
//! `blake3::hash` of a 4 KiB block compresses its 4 chunks side by side, which fills 4 of
//! AVX2's 8 and AVX-512's 16 lanes. Here lane `i` holds block `i` instead: chunk `c` of every
//! block is compressed at once (same chunk counter in every lane), then the two parent nodes
//! and the root of every block. Chaining values stay transposed (one vector per word) from the
//! chunks to the root, so only the message blocks need transposing. Digests are standard
//! BLAKE3 (`blake3::hash` of the block), which the tests check on every backend the machine has.
//!
//! Safety: the SIMD code is `unsafe` only because its intrinsics need an instruction set the
//! compiler cannot assume; `Backend::supported` checks it at run time before `hash_blocks_with`
//! enters `x86::hash8` or `x86::hash16`, the two `#[target_feature]` entry points. Below them
//! every `unsafe fn` has that one precondition (its `# Safety` section) and every `unsafe`
//! block a `// SAFETY:` note; memory is touched only through bounds-checked slices and
//! fixed-size arrays, with unaligned loads and stores. Cargo.toml's lints
//! (`undocumented_unsafe_blocks`, `unsafe_op_in_unsafe_fn`) fail the build on a block
//! without its note.

/// Bytes of a block hashed in a lane.
pub const BLOCK: usize = 4096;
const CHUNK: usize = 1024;

pub type Digest = [u8; 32];

const MSG: usize = 64;
/// [`MSG`] as the compression function takes it.
const MSG_U32: u32 = 64;

/// The chunk counter of chunk `chunk` of a block (at most 3).
fn chunk_counter(chunk: usize) -> u32 {
    u32::try_from(chunk).unwrap_or(u32::MAX)
}

const IV: [u32; 8] = [
    0x6A09E667, 0xBB67AE85, 0x3C6EF372, 0xA54FF53A, 0x510E527F, 0x9B05688C, 0x1F83D9AB, 0x5BE0CD19,
];
const CHUNK_START: u32 = 1;
const CHUNK_END: u32 = 2;
const PARENT: u32 = 4;
const ROOT: u32 = 8;

/// Message word order of each of the 7 rounds: round 0 is the identity, each next round
/// applies BLAKE3's fixed permutation to the previous one.
const SCHEDULE: [[usize; 16]; 7] = {
    const PERMUTATION: [usize; 16] = [2, 6, 3, 10, 7, 0, 4, 13, 1, 11, 12, 5, 9, 14, 15, 8];
    let mut schedule = [[0; 16]; 7];
    let mut i = 0;
    while i < 16 {
        schedule[0][i] = i;
        i += 1;
    }
    let mut round = 1;
    while round < 7 {
        let mut i = 0;
        while i < 16 {
            schedule[round][i] = schedule[round - 1][PERMUTATION[i]];
            i += 1;
        }
        round += 1;
    }
    schedule
};

/// How blocks are hashed: chosen once from the CPU's features.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// 16 blocks at once.
    Avx512,
    /// 8 blocks at once.
    Avx2,
    /// `blake3::hash` of each block (which still uses SIMD within the block).
    Portable,
}

impl Backend {
    /// The widest backend this CPU runs.
    pub fn detect() -> Backend {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                return Backend::Avx512;
            }
            if std::arch::is_x86_feature_detected!("avx2") {
                return Backend::Avx2;
            }
        }
        Backend::Portable
    }

    /// Every backend this CPU runs, widest first (for tests and benchmarks).
    pub fn available() -> Vec<Backend> {
        [Backend::Avx512, Backend::Avx2, Backend::Portable]
            .into_iter()
            .filter(|b| b.supported())
            .collect()
    }

    /// Whether this CPU runs the backend.
    pub fn supported(self) -> bool {
        match self {
            #[cfg(target_arch = "x86_64")]
            Backend::Avx512 => std::arch::is_x86_feature_detected!("avx512f"),
            #[cfg(target_arch = "x86_64")]
            Backend::Avx2 => std::arch::is_x86_feature_detected!("avx2"),
            Backend::Portable => true,
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// Blocks hashed by one pass.
    pub fn lanes(self) -> usize {
        match self {
            Backend::Avx512 => 16,
            Backend::Avx2 => 8,
            Backend::Portable => 1,
        }
    }
}

/// Hashes every block with the widest backend; `out[i]` is `blake3::hash(blocks[i])`.
pub fn hash_blocks(blocks: &[&[u8; BLOCK]], out: &mut [Digest]) {
    hash_blocks_with(Backend::detect(), blocks, out)
}

/// Hashes every block with `backend` (the portable one if this CPU cannot run it). Full passes take `lanes` blocks; what remains goes through
/// a narrower backend, a lane-padded pass, or `blake3::hash` for a single block.
///
/// # Panics
/// If `out` is shorter than `blocks` (a caller bug, not bad input).
pub fn hash_blocks_with(backend: Backend, blocks: &[&[u8; BLOCK]], out: &mut [Digest]) {
    assert!(out.len() >= blocks.len(), "one digest per block");
    let backend = if backend.supported() {
        backend
    } else {
        Backend::Portable
    };
    let mut done = 0;
    let mut lanes = backend.lanes();
    let mut current = backend;
    while done < blocks.len() {
        let left = blocks.len() - done;
        if left < lanes {
            // Narrow down while a narrower SIMD backend still fills at least half its lanes.
            match current {
                Backend::Avx512 if left <= 8 => {
                    current = Backend::Avx2;
                    lanes = 8;
                    continue;
                }
                Backend::Avx2 if left < 2 || !Backend::Avx2.supported() => {
                    current = Backend::Portable;
                    lanes = 1;
                    continue;
                }
                _ => {}
            }
        }
        let take = left.min(lanes);
        let group = &blocks[done..done + take];
        let digests = &mut out[done..done + take];
        match current {
            Backend::Portable => {
                for (block, digest) in group.iter().zip(digests.iter_mut()) {
                    *digest = *blake3::hash(&block[..]).as_bytes();
                }
            }
            #[cfg(target_arch = "x86_64")]
            Backend::Avx512 => pass::<16>(group, digests, |b, o| {
                // SAFETY: `backend` (hence `current`, only ever narrowed from it) passed
                // `supported()`, the run-time check that this CPU has AVX-512F.
                unsafe { x86::hash16(b, o) }
            }),
            #[cfg(target_arch = "x86_64")]
            Backend::Avx2 => pass::<8>(group, digests, |b, o| {
                // SAFETY: `current` is Avx2 either because `backend` was and passed
                // `supported()`, or because it narrowed from Avx512, which passed it: every
                // CPU with AVX-512F has AVX2.
                unsafe { x86::hash8(b, o) }
            }),
            #[cfg(not(target_arch = "x86_64"))]
            _ => unreachable!("only the portable backend is available"),
        }
        done += take;
    }
}

/// Runs one `N`-lane pass over up to `N` blocks, padding missing lanes with the first block
/// and dropping their digests.
#[cfg(target_arch = "x86_64")]
fn pass<const N: usize>(
    group: &[&[u8; BLOCK]],
    digests: &mut [Digest],
    hash: impl Fn(&[&[u8; BLOCK]; N], &mut [Digest; N]),
) {
    let mut lanes = [group[0]; N];
    lanes[..group.len()].copy_from_slice(group);
    let mut out = [[0u8; 32]; N];
    hash(&lanes, &mut out);
    digests.copy_from_slice(&out[..group.len()]);
}

/// Lane-parallel 32-bit vector operations, implemented per instruction set.
///
/// # Safety
/// Every method is `unsafe` for one reason: the CPU running it must have the implementing
/// type's instruction set (AVX2 for `Avx2`, AVX-512F for `Avx512`), which only a run-time
/// check (`Backend::supported`) establishes. Memory is never the reason: the loads and stores
/// go through slices and arrays whose lengths are checked by indexing or fixed by their types,
/// and unaligned loads and stores need no alignment.
trait Lanes: Copy {
    const N: usize;
    /// # Safety
    /// The CPU must have the instruction set (see the trait).
    unsafe fn splat(x: u32) -> Self;
    /// # Safety
    /// The CPU must have the instruction set (see the trait).
    unsafe fn add(a: Self, b: Self) -> Self;
    /// # Safety
    /// The CPU must have the instruction set (see the trait).
    unsafe fn xor(a: Self, b: Self) -> Self;
    /// # Safety
    /// The CPU must have the instruction set (see the trait).
    unsafe fn ror16(a: Self) -> Self;
    /// # Safety
    /// The CPU must have the instruction set (see the trait).
    unsafe fn ror12(a: Self) -> Self;
    /// # Safety
    /// The CPU must have the instruction set (see the trait).
    unsafe fn ror8(a: Self) -> Self;
    /// # Safety
    /// The CPU must have the instruction set (see the trait).
    unsafe fn ror7(a: Self) -> Self;
    /// The 16 message words of the 64 bytes at `offset` of every block, word `i` of lane
    /// `l` in vector `i`. Expects `blocks.len() >= N` and `offset + 64 <= BLOCK`; otherwise
    /// indexing panics (it bounds-checks every row before the load).
    ///
    /// # Safety
    /// The CPU must have the instruction set (see the trait).
    unsafe fn load_message(blocks: &[&[u8; BLOCK]], offset: usize) -> [Self; 16];
    /// Stores the lanes in order into `out[..N]`.
    ///
    /// # Safety
    /// The CPU must have the instruction set (see the trait).
    unsafe fn store(a: Self, out: &mut [u32; 16]);
}

/// BLAKE3's quarter-round G on columns or diagonals `a, b, c, d` of every lane.
///
/// # Safety
/// The CPU must have `V`'s instruction set.
#[inline(always)]
unsafe fn g<V: Lanes>(v: &mut [V; 16], a: usize, b: usize, c: usize, d: usize, x: V, y: V) {
    // SAFETY: the lane operations' only precondition is the instruction set, which this function's
    // own contract passes on to its caller.
    unsafe {
        v[a] = V::add(V::add(v[a], v[b]), x);
        v[d] = V::ror16(V::xor(v[d], v[a]));
        v[c] = V::add(v[c], v[d]);
        v[b] = V::ror12(V::xor(v[b], v[c]));
        v[a] = V::add(V::add(v[a], v[b]), y);
        v[d] = V::ror8(V::xor(v[d], v[a]));
        v[c] = V::add(v[c], v[d]);
        v[b] = V::ror7(V::xor(v[b], v[c]));
    }
}

/// The BLAKE3 compression function in every lane; returns the new chaining value.
///
/// # Safety
/// The CPU must have `V`'s instruction set.
#[inline(always)]
unsafe fn compress<V: Lanes>(cv: &[V; 8], m: &[V; 16], counter: u32, flags: u32) -> [V; 8] {
    // SAFETY: as in `g`: register-only lane operations; the caller guarantees the instruction set.
    unsafe {
        let mut v = [
            cv[0],
            cv[1],
            cv[2],
            cv[3],
            cv[4],
            cv[5],
            cv[6],
            cv[7],
            V::splat(IV[0]),
            V::splat(IV[1]),
            V::splat(IV[2]),
            V::splat(IV[3]),
            V::splat(counter),
            V::splat(0),
            V::splat(MSG_U32),
            V::splat(flags),
        ];
        for s in &SCHEDULE {
            g(&mut v, 0, 4, 8, 12, m[s[0]], m[s[1]]);
            g(&mut v, 1, 5, 9, 13, m[s[2]], m[s[3]]);
            g(&mut v, 2, 6, 10, 14, m[s[4]], m[s[5]]);
            g(&mut v, 3, 7, 11, 15, m[s[6]], m[s[7]]);
            g(&mut v, 0, 5, 10, 15, m[s[8]], m[s[9]]);
            g(&mut v, 1, 6, 11, 12, m[s[10]], m[s[11]]);
            g(&mut v, 2, 7, 8, 13, m[s[12]], m[s[13]]);
            g(&mut v, 3, 4, 9, 14, m[s[14]], m[s[15]]);
        }
        std::array::from_fn(|i| V::xor(v[i], v[i + 8]))
    }
}

/// Hashes `V::N` blocks, one per lane (`blocks` and `out` hold at least `V::N`; fewer
/// panics in indexing).
///
/// # Safety
/// The CPU must have `V`'s instruction set.
#[inline(always)]
unsafe fn hash_lanes<V: Lanes>(blocks: &[&[u8; BLOCK]], out: &mut [Digest]) {
    // SAFETY: `load_message` is called with `blocks.len() == V::N` (the entry points take arrays of
    // exactly N) and offsets below BLOCK - 64; the rest are register-only lane operations; the
    // caller guarantees the instruction set.
    unsafe {
        let iv: [V; 8] = std::array::from_fn(|i| V::splat(IV[i]));
        let mut chunk_cvs = [iv; 4];
        for (chunk, chunk_cv) in chunk_cvs.iter_mut().enumerate() {
            let mut cv = iv;
            for i in 0..CHUNK / MSG {
                let m = V::load_message(blocks, chunk * CHUNK + i * MSG);
                let mut flags = 0;
                if i == 0 {
                    flags |= CHUNK_START;
                }
                if i == CHUNK / MSG - 1 {
                    flags |= CHUNK_END;
                }
                cv = compress(&cv, &m, chunk_counter(chunk), flags);
            }
            *chunk_cv = cv;
        }
        let join = |l: &[V; 8], r: &[V; 8]| -> [V; 16] {
            std::array::from_fn(|i| if i < 8 { l[i] } else { r[i - 8] })
        };
        let left = compress(&iv, &join(&chunk_cvs[0], &chunk_cvs[1]), 0, PARENT);
        let right = compress(&iv, &join(&chunk_cvs[2], &chunk_cvs[3]), 0, PARENT);
        let root = compress(&iv, &join(&left, &right), 0, PARENT | ROOT);
        let mut words = [[0u32; 16]; 8];
        for (word, lanes) in root.iter().zip(words.iter_mut()) {
            V::store(*word, lanes);
        }
        for (lane, digest) in out.iter_mut().enumerate().take(V::N) {
            for (i, lanes) in words.iter().enumerate() {
                digest[4 * i..4 * i + 4].copy_from_slice(&lanes[lane].to_le_bytes());
            }
        }
    }
}

// The AVX-512 intrinsics are stable since Rust 1.89, hence Cargo.toml's rust-version.
#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{BLOCK, Digest, Lanes, hash_lanes};

    #[derive(Clone, Copy)]
    struct Avx2(__m256i);

    impl Lanes for Avx2 {
        const N: usize = 8;
        #[inline(always)]
        unsafe fn splat(x: u32) -> Self {
            // SAFETY: register-only AVX2 intrinsic; the trait's contract makes the caller guarantee
            // AVX2.
            unsafe { Avx2(_mm256_set1_epi32(x as i32)) }
        }
        #[inline(always)]
        unsafe fn add(a: Self, b: Self) -> Self {
            // SAFETY: register-only AVX2 intrinsic; the trait's contract makes the caller guarantee
            // AVX2.
            unsafe { Avx2(_mm256_add_epi32(a.0, b.0)) }
        }
        #[inline(always)]
        unsafe fn xor(a: Self, b: Self) -> Self {
            // SAFETY: register-only AVX2 intrinsic; the trait's contract makes the caller guarantee
            // AVX2.
            unsafe { Avx2(_mm256_xor_si256(a.0, b.0)) }
        }
        #[inline(always)]
        unsafe fn ror16(a: Self) -> Self {
            // SAFETY: register-only AVX2 intrinsic; the trait's contract makes the caller guarantee
            // AVX2.
            unsafe {
                let m = _mm256_set_epi8(
                    13, 12, 15, 14, 9, 8, 11, 10, 5, 4, 7, 6, 1, 0, 3, 2, 13, 12, 15, 14, 9, 8, 11,
                    10, 5, 4, 7, 6, 1, 0, 3, 2,
                );
                Avx2(_mm256_shuffle_epi8(a.0, m))
            }
        }
        #[inline(always)]
        unsafe fn ror12(a: Self) -> Self {
            // SAFETY: register-only AVX2 intrinsic; the trait's contract makes the caller guarantee
            // AVX2.
            unsafe {
                Avx2(_mm256_or_si256(
                    _mm256_srli_epi32(a.0, 12),
                    _mm256_slli_epi32(a.0, 20),
                ))
            }
        }
        #[inline(always)]
        unsafe fn ror8(a: Self) -> Self {
            // SAFETY: register-only AVX2 intrinsic; the trait's contract makes the caller guarantee
            // AVX2.
            unsafe {
                let m = _mm256_set_epi8(
                    12, 15, 14, 13, 8, 11, 10, 9, 4, 7, 6, 5, 0, 3, 2, 1, 12, 15, 14, 13, 8, 11,
                    10, 9, 4, 7, 6, 5, 0, 3, 2, 1,
                );
                Avx2(_mm256_shuffle_epi8(a.0, m))
            }
        }
        #[inline(always)]
        unsafe fn ror7(a: Self) -> Self {
            // SAFETY: register-only AVX2 intrinsic; the trait's contract makes the caller guarantee
            // AVX2.
            unsafe {
                Avx2(_mm256_or_si256(
                    _mm256_srli_epi32(a.0, 7),
                    _mm256_slli_epi32(a.0, 25),
                ))
            }
        }
        #[inline(always)]
        unsafe fn load_message(blocks: &[&[u8; BLOCK]], offset: usize) -> [Self; 16] {
            // SAFETY: every load reads 32 bytes of a slice that indexing has already bounds-checked
            // (`bytes` is exactly 32 bytes long); unaligned loads need no alignment; AVX2 is
            // guaranteed by the caller.
            unsafe {
                let mut m = [Avx2(_mm256_setzero_si256()); 16];
                for half in 0..2 {
                    // Row l: 8 words of block l; transposed into one vector per word.
                    let row: [__m256i; 8] = std::array::from_fn(|l| {
                        let bytes = &blocks[l][offset + 32 * half..offset + 32 * half + 32];
                        _mm256_loadu_si256(bytes.as_ptr().cast())
                    });
                    let cols = transpose8(row);
                    for (i, col) in cols.into_iter().enumerate() {
                        m[8 * half + i] = Avx2(col);
                    }
                }
                m
            }
        }
        #[inline(always)]
        unsafe fn store(a: Self, out: &mut [u32; 16]) {
            // SAFETY: `out` is 16 u32 = 64 bytes, the store writes the first 32 (unaligned store);
            // AVX2 is guaranteed by the caller.
            unsafe { _mm256_storeu_si256(out.as_mut_ptr().cast(), a.0) }
        }
    }

    /// 8x8 transpose of 32-bit words: `r[l][i]` becomes `c[i][l]`.
    ///
    /// # Safety
    /// The CPU must have AVX2.
    #[inline(always)]
    unsafe fn transpose8(r: [__m256i; 8]) -> [__m256i; 8] {
        // SAFETY: register-only unpack and permute intrinsics; AVX2 is guaranteed by the caller.
        unsafe {
            let t: [__m256i; 8] = std::array::from_fn(|k| {
                let (a, b) = (r[k & !1], r[k | 1]);
                if k % 2 == 0 {
                    _mm256_unpacklo_epi32(a, b)
                } else {
                    _mm256_unpackhi_epi32(a, b)
                }
            });
            // u[4q + s]: word s (and s + 4 in the upper half) of rows 4q..4q+4.
            let u: [__m256i; 8] = std::array::from_fn(|k| {
                let (q, s) = (k / 4, k % 4);
                let (a, b) = (t[4 * q + s / 2], t[4 * q + 2 + s / 2]);
                if s % 2 == 0 {
                    _mm256_unpacklo_epi64(a, b)
                } else {
                    _mm256_unpackhi_epi64(a, b)
                }
            });
            std::array::from_fn(|i| {
                let s = i % 4;
                if i < 4 {
                    _mm256_permute2x128_si256(u[s], u[4 + s], 0x20)
                } else {
                    _mm256_permute2x128_si256(u[s], u[4 + s], 0x31)
                }
            })
        }
    }

    #[derive(Clone, Copy)]
    struct Avx512(__m512i);

    impl Lanes for Avx512 {
        const N: usize = 16;
        #[inline(always)]
        unsafe fn splat(x: u32) -> Self {
            // SAFETY: register-only AVX-512F intrinsic; the trait's contract makes the caller
            // guarantee AVX-512F.
            unsafe { Avx512(_mm512_set1_epi32(x as i32)) }
        }
        #[inline(always)]
        unsafe fn add(a: Self, b: Self) -> Self {
            // SAFETY: register-only AVX-512F intrinsic; the trait's contract makes the caller
            // guarantee AVX-512F.
            unsafe { Avx512(_mm512_add_epi32(a.0, b.0)) }
        }
        #[inline(always)]
        unsafe fn xor(a: Self, b: Self) -> Self {
            // SAFETY: register-only AVX-512F intrinsic; the trait's contract makes the caller
            // guarantee AVX-512F.
            unsafe { Avx512(_mm512_xor_si512(a.0, b.0)) }
        }
        #[inline(always)]
        unsafe fn ror16(a: Self) -> Self {
            // SAFETY: register-only AVX-512F intrinsic; the trait's contract makes the caller
            // guarantee AVX-512F.
            unsafe { Avx512(_mm512_ror_epi32::<16>(a.0)) }
        }
        #[inline(always)]
        unsafe fn ror12(a: Self) -> Self {
            // SAFETY: register-only AVX-512F intrinsic; the trait's contract makes the caller
            // guarantee AVX-512F.
            unsafe { Avx512(_mm512_ror_epi32::<12>(a.0)) }
        }
        #[inline(always)]
        unsafe fn ror8(a: Self) -> Self {
            // SAFETY: register-only AVX-512F intrinsic; the trait's contract makes the caller
            // guarantee AVX-512F.
            unsafe { Avx512(_mm512_ror_epi32::<8>(a.0)) }
        }
        #[inline(always)]
        unsafe fn ror7(a: Self) -> Self {
            // SAFETY: register-only AVX-512F intrinsic; the trait's contract makes the caller
            // guarantee AVX-512F.
            unsafe { Avx512(_mm512_ror_epi32::<7>(a.0)) }
        }
        #[inline(always)]
        unsafe fn load_message(blocks: &[&[u8; BLOCK]], offset: usize) -> [Self; 16] {
            // SAFETY: every load reads 64 bytes of a slice that indexing has already bounds-checked
            // (`bytes` is exactly 64 bytes long); unaligned loads need no alignment; AVX-512F is
            // guaranteed by the caller.
            unsafe {
                let rows: [__m512i; 16] = std::array::from_fn(|l| {
                    let bytes = &blocks[l][offset..offset + 64];
                    _mm512_loadu_si512(bytes.as_ptr().cast())
                });
                transpose16(rows).map(Avx512)
            }
        }
        #[inline(always)]
        unsafe fn store(a: Self, out: &mut [u32; 16]) {
            // SAFETY: `out` is 16 u32 = 64 bytes, exactly what the unaligned store writes; AVX-512F
            // is guaranteed by the caller.
            unsafe { _mm512_storeu_si512(out.as_mut_ptr().cast(), a.0) }
        }
    }

    /// 16x16 transpose of 32-bit words: `r[l][i]` becomes `c[i][l]`.
    ///
    /// # Safety
    /// The CPU must have AVX-512F.
    #[inline(always)]
    unsafe fn transpose16(r: [__m512i; 16]) -> [__m512i; 16] {
        // SAFETY: register-only unpack and shuffle intrinsics; AVX-512F is guaranteed by the
        // caller.
        unsafe {
            // Within each 128-bit lane j, t[2p] holds words 4j, 4j+1 and t[2p+1] words
            // 4j+2, 4j+3 of rows 2p and 2p+1, interleaved.
            let t: [__m512i; 16] = std::array::from_fn(|k| {
                let (a, b) = (r[k & !1], r[k | 1]);
                if k % 2 == 0 {
                    _mm512_unpacklo_epi32(a, b)
                } else {
                    _mm512_unpackhi_epi32(a, b)
                }
            });
            // u[4q + s], 128-bit lane j: word 4j + s of rows 4q..4q+4.
            let u: [__m512i; 16] = std::array::from_fn(|k| {
                let (q, s) = (k / 4, k % 4);
                let (a, b) = (t[4 * q + s / 2], t[4 * q + 2 + s / 2]);
                if s % 2 == 0 {
                    _mm512_unpacklo_epi64(a, b)
                } else {
                    _mm512_unpackhi_epi64(a, b)
                }
            });
            let mut c = [_mm512_setzero_si512(); 16];
            for s in 0..4 {
                // 128-bit lanes (0, 1) and (2, 3) of rows 0..8 and of rows 8..16.
                let lo_a = _mm512_shuffle_i32x4::<0b01_00_01_00>(u[s], u[4 + s]);
                let hi_a = _mm512_shuffle_i32x4::<0b11_10_11_10>(u[s], u[4 + s]);
                let lo_b = _mm512_shuffle_i32x4::<0b01_00_01_00>(u[8 + s], u[12 + s]);
                let hi_b = _mm512_shuffle_i32x4::<0b11_10_11_10>(u[8 + s], u[12 + s]);
                c[s] = _mm512_shuffle_i32x4::<0b10_00_10_00>(lo_a, lo_b);
                c[4 + s] = _mm512_shuffle_i32x4::<0b11_01_11_01>(lo_a, lo_b);
                c[8 + s] = _mm512_shuffle_i32x4::<0b10_00_10_00>(hi_a, hi_b);
                c[12 + s] = _mm512_shuffle_i32x4::<0b11_01_11_01>(hi_a, hi_b);
            }
            c
        }
    }

    /// # Safety
    /// The CPU must have AVX2.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn hash8(blocks: &[&[u8; BLOCK]; 8], out: &mut [Digest; 8]) {
        // SAFETY: this function is compiled with AVX2 enabled and its caller checked the CPU has it
        // (`available()`); `blocks` holds exactly 8 blocks, as `hash_lanes::<Avx2>` needs.
        unsafe { hash_lanes::<Avx2>(blocks, out) }
    }

    /// # Safety
    /// The CPU must have AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn hash16(blocks: &[&[u8; BLOCK]; 16], out: &mut [Digest; 16]) {
        // SAFETY: this function is compiled with AVX-512F enabled and its caller checked the CPU
        // has it (`available()`); `blocks` holds exactly 16 blocks, as `hash_lanes::<Avx512>`
        // needs.
        unsafe { hash_lanes::<Avx512>(blocks, out) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn reference(blocks: &[&[u8; BLOCK]]) -> Vec<Digest> {
        blocks
            .iter()
            .map(|b| *blake3::hash(&b[..]).as_bytes())
            .collect()
    }

    fn check(backend: Backend, data: &[[u8; BLOCK]]) {
        let blocks: Vec<&[u8; BLOCK]> = data.iter().collect();
        let mut out = vec![[0u8; 32]; blocks.len()];
        hash_blocks_with(backend, &blocks, &mut out);
        assert_eq!(
            out,
            reference(&blocks),
            "{backend:?}, {} blocks",
            blocks.len()
        );
    }

    fn random_blocks(seed: u64, count: usize) -> Vec<[u8; BLOCK]> {
        // xorshift: every byte position gets varied content, so a lane or word mix-up shows.
        let mut x = seed | 1;
        (0..count)
            .map(|_| {
                let mut block = [0u8; BLOCK];
                for word in block.chunks_mut(8) {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    word.copy_from_slice(&x.to_le_bytes());
                }
                block
            })
            .collect()
    }

    #[test]
    fn schedule_matches_blake3_spec() {
        // Round 1 and 6 as listed in the BLAKE3 specification.
        assert_eq!(
            SCHEDULE[1],
            [2, 6, 3, 10, 7, 0, 4, 13, 1, 11, 12, 5, 9, 14, 15, 8]
        );
        assert_eq!(
            SCHEDULE[6],
            [11, 15, 5, 0, 1, 9, 8, 6, 14, 10, 2, 12, 3, 4, 7, 13]
        );
    }

    #[test]
    fn portable_is_always_available() {
        assert_eq!(Backend::available().last(), Some(&Backend::Portable));
        assert_eq!(Backend::available()[0], Backend::detect());
    }

    #[test]
    fn every_count_on_every_backend() {
        // All remainders (0..=40 blocks) through every narrowing path.
        let data = random_blocks(7, 40);
        for backend in Backend::available() {
            for count in 0..=data.len() {
                check(backend, &data[..count]);
            }
        }
    }

    #[test]
    fn lanes_with_the_same_block_agree() {
        let data = vec![[0xA5u8; BLOCK]; 17];
        for backend in Backend::available() {
            check(backend, &data);
        }
    }

    #[test]
    fn blocks_in_any_order_and_repeated() {
        // Lanes point at non-contiguous, repeated blocks, as for the non-zero blocks of a read.
        let data = random_blocks(99, 5);
        let order = [3, 0, 4, 4, 1, 2, 0, 3, 1, 2, 4, 4, 0, 0, 1, 3, 2, 4, 1];
        let blocks: Vec<&[u8; BLOCK]> = order.iter().map(|&i| &data[i]).collect();
        for backend in Backend::available() {
            let mut out = vec![[0u8; 32]; blocks.len()];
            hash_blocks_with(backend, &blocks, &mut out);
            assert_eq!(out, reference(&blocks), "{backend:?}");
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn random_blocks_hash_as_blake3(seed in any::<u64>(), count in 1usize..48,
                                        flips in proptest::collection::vec((0usize..48, 0usize..BLOCK, 1u8..), 0..8)) {
            let mut data = random_blocks(seed, count);
            for (block, byte, bit) in flips {
                if let Some(b) = data.get_mut(block) {
                    b[byte] ^= bit;
                }
            }
            for backend in Backend::available() {
                check(backend, &data);
            }
        }
    }
}
