//! Boot working sets in the catalog ([`crate::workset`]): one sealed record per (image id,
//! phase) in their own table. Keyed by id, not name, so a re-captured image (a new id)
//! starts without the old version's sets; sets of forgotten images are dropped at the next
//! recording ([`Catalog::save_working_set`]). They are hints, not state: they are not in the
//! backup, and a damaged one reads as absent (logged), to be recorded again.

use redb::{ReadableTable, TableDefinition};

use super::{Catalog, CatalogContext, IMAGES};
use crate::error::Result;
use crate::map::ImageId;
use crate::records::{seal, unseal};
use crate::workset::{WorkingSet, decode, encode};

/// (image id, phase) -> sealed [`crate::workset::encode`] record.
const WORKING_SETS: TableDefinition<(u32, &str), &[u8]> = TableDefinition::new("working_sets");

impl Catalog {
    /// The working sets of image `id`, by phase.
    pub fn working_sets(&self, id: ImageId) -> Result<Vec<(String, WorkingSet)>> {
        let dir = self.dir();
        let txn = self.read_txn()?;
        let Some(table) = self.table_if_made(&txn, WORKING_SETS)? else {
            return Ok(Vec::new());
        };
        let mut sets = Vec::new();
        for entry in table.range((id, "")..).ctx(dir)? {
            let (key, value) = entry.ctx(dir)?;
            let (image, phase) = key.value();
            if image != id {
                break;
            }
            match unseal(value.value()).and_then(decode) {
                Ok(set) => sets.push((phase.to_string(), set)),
                Err(e) => tracing::warn!(
                    "working set {phase:?} of image {id} is damaged ({e}): ignored until recorded again"
                ),
            }
        }
        Ok(sets)
    }

    /// Stores `set` as image `id`'s working set of `phase` (replacing it), and drops the sets
    /// of other images no longer in the catalog, in one transaction.
    pub fn save_working_set(&self, id: ImageId, phase: &str, set: &WorkingSet) -> Result<()> {
        let _guard = self.lock()?;
        let dir = self.dir();
        let txn = self.write_txn()?;
        {
            let images = txn.open_table(IMAGES).ctx(dir)?;
            let mut table = txn.open_table(WORKING_SETS).ctx(dir)?;
            let mut stale = Vec::new();
            for entry in table.iter().ctx(dir)? {
                let (key, _) = entry.ctx(dir)?;
                let (image, phase) = key.value();
                if image != id && images.get(image).ctx(dir)?.is_none() {
                    stale.push((image, phase.to_string()));
                }
            }
            for (image, phase) in &stale {
                table.remove((*image, phase.as_str())).ctx(dir)?;
            }
            table
                .insert((id, phase), seal(&encode(set)).as_slice())
                .ctx(dir)?;
        }
        self.commit(txn)
    }

    /// Drops image `id`'s working sets (of `phase`, or all); returns how many there were.
    pub fn forget_working_sets(&self, id: ImageId, phase: Option<&str>) -> Result<usize> {
        let _guard = self.lock()?;
        let dir = self.dir();
        let txn = self.write_txn()?;
        let removed = {
            let mut table = txn.open_table(WORKING_SETS).ctx(dir)?;
            let mut keys = Vec::new();
            for entry in table.range((id, "")..).ctx(dir)? {
                let (key, _) = entry.ctx(dir)?;
                let (image, p) = key.value();
                if image != id {
                    break;
                }
                if phase.is_none_or(|phase| phase == p) {
                    keys.push(p.to_string());
                }
            }
            for p in &keys {
                table.remove((id, p.as_str())).ctx(dir)?;
            }
            keys.len()
        };
        self.commit(txn)?;
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workset::Run;

    fn set(start: u64, recordings: u32) -> WorkingSet {
        WorkingSet {
            runs: vec![Run { start, len: 3 }],
            seen: vec![recordings],
            recordings,
            updated: 42,
        }
    }

    #[test]
    fn sets_are_kept_by_image_and_phase_and_stale_ones_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let catalog = Catalog::open(dir.path()).unwrap();
        assert!(catalog.working_sets(7).unwrap().is_empty());
        catalog.save_working_set(7, "boot", &set(0, 1)).unwrap();
        catalog.save_working_set(7, "app", &set(9, 1)).unwrap();
        catalog.save_working_set(7, "boot", &set(4, 2)).unwrap();
        assert_eq!(
            catalog.working_sets(7).unwrap(),
            vec![
                ("app".to_string(), set(9, 1)),
                ("boot".to_string(), set(4, 2))
            ]
        );
        assert!(catalog.working_sets(6).unwrap().is_empty());
        assert!(catalog.working_sets(8).unwrap().is_empty());
        // Image 7 is not in the catalog: saving another image's set drops its sets.
        catalog.save_working_set(8, "boot", &set(1, 1)).unwrap();
        assert!(catalog.working_sets(7).unwrap().is_empty());
        assert_eq!(catalog.working_sets(8).unwrap().len(), 1);
        assert_eq!(catalog.forget_working_sets(8, Some("app")).unwrap(), 0);
        assert_eq!(catalog.forget_working_sets(8, None).unwrap(), 1);
        assert!(catalog.working_sets(8).unwrap().is_empty());
        // They survive a re-open.
        catalog.save_working_set(9, "boot", &set(2, 5)).unwrap();
        drop(catalog);
        let catalog = Catalog::open(dir.path()).unwrap();
        assert_eq!(
            catalog.working_sets(9).unwrap(),
            vec![("boot".to_string(), set(2, 5))]
        );
    }
}
