//! The reference table ([`REFS`]): which images each map redirects to, kept as maps are
//! written and rewritten.

use super::*;

impl Catalog {
    /// Records which images `map` redirects to.
    pub(super) fn add_refs(&self, txn: &WriteTransaction, map: &BlockMap) -> Result<()> {
        let mut refs = txn.open_table(REFS).ctx(&self.dir)?;
        for (target, blocks) in map.redirects_by_image() {
            refs.insert((target, map.image), blocks).ctx(&self.dir)?;
        }
        Ok(())
    }

    /// Forgets which images `map` redirects to.
    pub(super) fn remove_refs(&self, txn: &WriteTransaction, map: &BlockMap) -> Result<()> {
        let mut refs = txn.open_table(REFS).ctx(&self.dir)?;
        for target in map.redirects_by_image().keys() {
            refs.remove((*target, map.image)).ctx(&self.dir)?;
        }
        Ok(())
    }
}
