//! dm-stats, as the kernel speaks it: the output of the `@stats_list` and `@stats_print`
//! messages parsed into regions and per-area read counters. The arithmetic over them is in
//! [`crate::stats`]; the in-memory kernel produces the same values directly.

/// Read counters of one dm-stats area. (Its request count is left out: dm-stats counts a
/// request once in every area it touches, so per-area counts do not add up to requests.)
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AreaReads {
    pub start: u64,
    pub len: u64,
    pub sectors_read: u64,
}

/// Parses the output of `@stats_print`: one line per area, `START+LEN` and counters of
/// which the 3rd is sectors read.
pub fn parse_stats_print(text: &str) -> Result<Vec<AreaReads>, String> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|line| {
            let mut words = line.split_whitespace();
            let range = words.next().unwrap_or_default();
            let (start, len) = range
                .split_once('+')
                .and_then(|(s, l)| Some((s.parse().ok()?, l.parse().ok()?)))
                .ok_or_else(|| format!("bad area {range:?} in {line:?}"))?;
            let counters: Vec<u64> = words
                .map(|w| w.parse::<u64>())
                .collect::<Result<_, _>>()
                .map_err(|e| format!("bad counter in {line:?}: {e}"))?;
            if counters.len() < 3 {
                return Err(format!("too few counters in {line:?}"));
            }
            Ok(AreaReads {
                start,
                len,
                sectors_read: counters[2],
            })
        })
        .collect()
}

/// A region as `@stats_list` reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Region {
    pub id: u64,
    pub start: u64,
    pub len: u64,
    pub step: u64,
    pub program: String,
}

/// Parses the output of `@stats_list`: `ID: START+LEN STEP PROGRAM AUX ...` per region.
pub fn parse_stats_list(text: &str) -> Result<Vec<Region>, String> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|line| {
            let bad = || format!("bad region line {line:?}");
            let (id, rest) = line.split_once(':').ok_or_else(bad)?;
            let mut words = rest.split_whitespace();
            let (start, len) = words
                .next()
                .and_then(|r| r.split_once('+'))
                .and_then(|(s, l)| Some((s.parse().ok()?, l.parse().ok()?)))
                .ok_or_else(bad)?;
            let step = words.next().and_then(|s| s.parse().ok()).ok_or_else(bad)?;
            Ok(Region {
                id: id.trim().parse().map_err(|_| bad())?,
                start,
                len,
                step,
                program: words.next().unwrap_or("-").to_string(),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_output_parses_and_garbage_is_refused() {
        let print = "0+8 3 0 24 1 0 0 0 0 0 1 1 1 0\n8+8 0 0 0 0 0 0 0 0 0 0 0 0 0\n";
        assert_eq!(
            parse_stats_print(print).unwrap(),
            [
                AreaReads {
                    start: 0,
                    len: 8,
                    sectors_read: 24
                },
                AreaReads {
                    start: 8,
                    len: 8,
                    sectors_read: 0
                }
            ]
        );
        assert!(parse_stats_print("0+8 1 x 3\n").is_err());
        assert!(parse_stats_print("08 1 2 3\n").is_err());
        assert!(parse_stats_print("0+8 1 2\n").is_err());
        let list = "0: 0+2048 8 vmar -\n3: 16+8 8 dmstats some aux\n";
        assert_eq!(
            parse_stats_list(list).unwrap(),
            [
                Region {
                    id: 0,
                    start: 0,
                    len: 2048,
                    step: 8,
                    program: "vmar".into()
                },
                Region {
                    id: 3,
                    start: 16,
                    len: 8,
                    step: 8,
                    program: "dmstats".into()
                }
            ]
        );
        assert!(parse_stats_list("zero: 0+8 8 vmar -").is_err());
        assert!(parse_stats_list("0 0+8 8 vmar -").is_err());
        assert_eq!(parse_stats_list("").unwrap(), []);
    }
}
