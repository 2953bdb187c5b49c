//! Target budget: fits a map into a bounded number of device-mapper targets.
//!
//! Every extent becomes a target, and each target costs kernel memory and table load time;
//! Linux >= 6.6 refuses tables over 1,048,576 targets. When a map has more extents than the
//! budget, extents are served from the image itself instead (always correct: the image holds
//! every block), cheapest first: the ones that give up the fewest blocks per target saved.
//! A redirect or zero run between two own runs saves two targets when it becomes own, one
//! next to a single own run. Pure logic, no I/O.

use serde::{Deserialize, Serialize};

use crate::map::{BlockMap, MapBuilder, Source};

/// What fitting a map into the budget cost.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BudgetCost {
    pub budget: u64,
    /// Extents of the map before and after.
    pub extents_before: u64,
    pub extents_after: u64,
    /// Redirected blocks now read from the image itself: sharing given up.
    pub redirected_blocks_dropped: u64,
    /// Zero blocks now read from the image itself.
    pub zero_blocks_dropped: u64,
}

/// Returns `map` reduced to at most `budget` extents (at least one), and the cost.
pub fn fit(map: &BlockMap, budget: u64) -> (BlockMap, BudgetCost) {
    let budget = budget.max(1);
    let mut cost = BudgetCost {
        budget,
        extents_before: map.extents.len() as u64,
        ..BudgetCost::default()
    };
    let mut current = map.clone();
    while current.extents.len() as u64 > budget {
        let excess = current.extents.len() as u64 - budget;
        let extents = &current.extents;
        let own = |i: Option<usize>| {
            i.and_then(|i| extents.get(i))
                .is_some_and(|e| e.source == Source::Own)
        };
        // (blocks given up per target saved, index): cheapest first.
        let mut candidates: Vec<(u64, u64, usize)> = extents
            .iter()
            .enumerate()
            .filter(|(_, e)| e.source != Source::Own)
            .filter_map(|(i, e)| {
                let saved = u64::from(own(i.checked_sub(1))) + u64::from(own(Some(i + 1)));
                (saved > 0).then(|| (e.len.div_ceil(saved), saved, i))
            })
            .collect();
        if candidates.is_empty() {
            // No own run to grow: make the shortest extent own, so that neighbours can join.
            let shortest = extents
                .iter()
                .enumerate()
                .filter(|(_, e)| e.source != Source::Own)
                .min_by_key(|(_, e)| e.len)
                .map(|(i, _)| i);
            let Some(i) = shortest else { break };
            candidates.push((0, 1, i));
        }
        candidates.sort_unstable();
        // Savings only grow as neighbours turn own, so converting until the estimate covers
        // the excess never converts too little by more than the next round fixes.
        let mut chosen = vec![false; extents.len()];
        let mut saved_total = 0;
        for (_, saved, i) in candidates {
            if saved_total >= excess {
                break;
            }
            chosen[i] = true;
            saved_total += saved;
        }
        let mut builder = MapBuilder::new(current.image, current.blocks);
        for (e, chosen) in extents.iter().zip(&chosen) {
            let source = if *chosen {
                match e.source {
                    Source::Zero => cost.zero_blocks_dropped += e.len,
                    _ => cost.redirected_blocks_dropped += e.len,
                }
                Source::Own
            } else {
                e.source
            };
            builder.push(e.start, e.len, source);
        }
        current = builder.finish();
    }
    cost.extents_after = current.extents.len() as u64;
    (current, cost)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::map::Extent;

    fn map_of(sources: &[(u64, Source)]) -> BlockMap {
        let mut b = MapBuilder::new(1, sources.iter().map(|s| s.0).sum());
        let mut at = 0;
        for (len, source) in sources {
            b.push(at, *len, *source);
            at += len;
        }
        b.finish()
    }

    fn redirect(block: u64) -> Source {
        Source::Redirect { image: 0, block }
    }

    /// Every block is served from the same content as before, or from the image itself.
    fn check_sound(before: &BlockMap, after: &BlockMap) {
        for block in 0..before.blocks {
            let now = after.source_of(block).unwrap();
            assert!(
                now == Source::Own || Some(now) == before.source_of(block),
                "block {block}: {now:?}"
            );
        }
    }

    #[test]
    fn within_budget_nothing_changes() {
        let map = map_of(&[(10, Source::Own), (2, redirect(5)), (10, Source::Own)]);
        let (fitted, cost) = fit(&map, 3);
        assert_eq!(fitted, map);
        assert_eq!(cost.extents_after, 3);
        assert_eq!(cost.redirected_blocks_dropped, 0);
    }

    #[test]
    fn short_redirects_splitting_own_runs_go_first() {
        let map = map_of(&[
            (100, Source::Own),
            (1, redirect(7)), // splits an own run: cheap
            (100, Source::Own),
            (50, redirect(100)), // long: keep
            (100, Source::Own),
        ]);
        let (fitted, cost) = fit(&map, 3);
        check_sound(&map, &fitted);
        assert_eq!(
            fitted.extents,
            vec![
                Extent {
                    start: 0,
                    len: 201,
                    source: Source::Own
                },
                Extent {
                    start: 201,
                    len: 50,
                    source: redirect(100)
                },
                Extent {
                    start: 251,
                    len: 100,
                    source: Source::Own
                },
            ]
        );
        assert_eq!(cost.redirected_blocks_dropped, 1);
        assert_eq!((cost.extents_before, cost.extents_after), (5, 3));
    }

    #[test]
    fn any_map_fits_any_budget() {
        // Alternating redirects and zeros with no own run at all.
        let sources: Vec<(u64, Source)> = (0..200)
            .map(|i| {
                if i % 2 == 0 {
                    (1 + i % 7, redirect(1000 * i))
                } else {
                    (1 + i % 5, Source::Zero)
                }
            })
            .collect();
        let map = map_of(&sources);
        for budget in [0, 1, 2, 10, 150, 199, 200, 1000] {
            let (fitted, cost) = fit(&map, budget);
            assert!(
                fitted.extents.len() as u64 <= budget.max(1),
                "budget {budget}"
            );
            assert_eq!(cost.extents_after, fitted.extents.len() as u64);
            check_sound(&map, &fitted);
        }
    }
}
