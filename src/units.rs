//! Unit types for sizes that are easy to mix up: device-mapper sectors (512 bytes) and
//! catalog blocks (4 KiB). Tables and live tables carry [`Sectors`]; conversions are explicit.

use std::fmt;
use std::ops::{Add, AddAssign, Sub};

use serde::{Deserialize, Serialize};

use crate::image::{BLOCK_SIZE, SECTOR_SIZE};

/// Sectors per catalog block.
pub const SECTORS_PER_BLOCK: u64 = BLOCK_SIZE / SECTOR_SIZE;

/// `n` as a `usize`: vmar runs on 64-bit Linux, where every `u64` fits; saturates elsewhere
/// (an allocation or index that large fails on its own).
#[allow(clippy::cast_possible_truncation)] // checked against usize::MAX first
pub const fn usize_of(n: u64) -> usize {
    if n > usize::MAX as u64 {
        usize::MAX
    } else {
        n as usize
    }
}

/// A count or offset of 512-byte device-mapper sectors.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Sectors(pub u64);

/// A count or offset of 4 KiB catalog blocks.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Blocks(pub u64);

impl Sectors {
    pub fn bytes(self) -> u64 {
        self.0 * SECTOR_SIZE
    }

    /// The sectors that hold `bytes` bytes, rounded down (a device is whole sectors).
    pub fn of_bytes(bytes: u64) -> Sectors {
        Sectors(bytes / SECTOR_SIZE)
    }
}

impl Blocks {
    pub fn sectors(self) -> Sectors {
        Sectors(self.0 * SECTORS_PER_BLOCK)
    }

    pub fn bytes(self) -> u64 {
        self.0 * BLOCK_SIZE
    }
}

macro_rules! arithmetic {
    ($t:ident) => {
        impl Add for $t {
            type Output = $t;
            fn add(self, other: $t) -> $t {
                $t(self.0 + other.0)
            }
        }
        impl AddAssign for $t {
            fn add_assign(&mut self, other: $t) {
                self.0 += other.0;
            }
        }
        impl Sub for $t {
            type Output = $t;
            fn sub(self, other: $t) -> $t {
                $t(self.0 - other.0)
            }
        }
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }
    };
}

arithmetic!(Sectors);
arithmetic!(Blocks);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conversions() {
        assert_eq!(Blocks(3).sectors(), Sectors(24));
        assert_eq!(Blocks(3).bytes(), 3 * 4096);
        assert_eq!(Sectors(3).bytes(), 1536);
        assert_eq!(Sectors::of_bytes(1537), Sectors(3));
        assert_eq!(Sectors(5) + Sectors(2) - Sectors(1), Sectors(6));
        assert_eq!(serde_json::to_string(&Sectors(7)).unwrap(), "7");
    }
}
