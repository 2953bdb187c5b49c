//! Tables that catalogs written before them lack ([`REFS`], [`PATHS`]), filled from every
//! map and record when such a catalog is opened.

use super::*;

impl Catalog {
    /// Fills [`REFS`] from every map (catalogs written before it existed).
    pub(super) fn build_refs(&self, txn: &WriteTransaction) -> Result<()> {
        txn.open_table(REFS)
            .ctx(&self.dir)?
            .retain(|_, _| false)
            .ctx(&self.dir)?;
        for id in self.ids(txn)? {
            let record = self.record_in(txn, id)?;
            self.add_refs(txn, &self.map_in(txn, id, record.size)?)?;
        }
        txn.open_table(META)
            .ctx(&self.dir)?
            .insert(REFS_BUILT, 1)
            .ctx(&self.dir)?;
        Ok(())
    }

    /// Fills [`PATHS`] from every record (catalogs written before it existed).
    pub(super) fn build_paths(&self, txn: &WriteTransaction) -> Result<()> {
        let dir = &self.dir;
        txn.open_table(PATHS)
            .ctx(dir)?
            .retain(|_, _| false)
            .ctx(dir)?;
        for id in self.ids(txn)? {
            let record = self.record_in(txn, id)?;
            txn.open_table(PATHS)
                .ctx(dir)?
                .insert(path_key(&record.path), id)
                .ctx(dir)?;
        }
        txn.open_table(META)
            .ctx(dir)?
            .insert(PATHS_BUILT, 1)
            .ctx(dir)?;
        Ok(())
    }
}
