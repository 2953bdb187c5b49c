//! Device records and name bindings: the devices a state dir made, and the image (by
//! fingerprint) each device name served, kept in the catalog.

use super::*;

impl Catalog {
    /// Saved devices, by name.
    pub fn devices(&self) -> Result<Vec<DeviceRecord>> {
        self.records(DEVICES, "device")
    }

    /// The saved device `name`, if any.
    pub fn device(&self, name: &str) -> Result<Option<DeviceRecord>> {
        Ok(self.devices()?.into_iter().find(|d| d.name == name))
    }

    /// Saves (or replaces) a device record.
    pub fn save_device(&self, record: &DeviceRecord) -> Result<()> {
        self.save_by_name(
            DEVICES,
            &record.name,
            record,
            "device record",
            crate::backup::Change::Device {
                record: record.clone(),
            },
        )
    }

    /// Removes a device record; true if there was one.
    pub fn forget_device(&self, name: &str) -> Result<bool> {
        let _guard = self.lock()?;
        let dir = &self.dir;
        let txn = self.write_txn()?;
        let existed = txn
            .open_table(DEVICES)
            .ctx(dir)?
            .remove(name)
            .ctx(dir)?
            .is_some();
        self.commit(txn)?;
        if existed {
            self.write_backup(vec![crate::backup::Change::ForgetDevice {
                name: name.to_string(),
            }]);
        }
        Ok(existed)
    }

    /// The content device name `name` last served, if it ever served any.
    pub fn name_binding(&self, name: &str) -> Result<Option<NameBinding>> {
        let dir = &self.dir;
        let txn = self.read_txn()?;
        let Some(table) = self.table_if_made(&txn, NAME_BINDINGS)? else {
            return Ok(None);
        };
        let Some(value) = table.get(name).ctx(dir)? else {
            return Ok(None);
        };
        Ok(Some(self.decode_json(value.value(), "name binding")?))
    }

    /// Every device name's binding, by name.
    pub fn name_bindings(&self) -> Result<Vec<NameBinding>> {
        if self
            .table_if_made(&self.read_txn()?, NAME_BINDINGS)?
            .is_none()
        {
            return Ok(Vec::new());
        }
        self.records(NAME_BINDINGS, "name binding")
    }

    /// Records (or replaces) the content a device name serves.
    pub fn bind_name(&self, binding: &NameBinding) -> Result<()> {
        self.save_by_name(
            NAME_BINDINGS,
            &binding.name,
            binding,
            "name binding",
            crate::backup::Change::BindName {
                binding: binding.clone(),
            },
        )
    }

    /// Saves `value` sealed under `name` in `table`, in a transaction of its own, then
    /// journals `change` to the backup. `what` names it in the error.
    fn save_by_name<T: serde::Serialize>(
        &self,
        table: TableDefinition<&str, &[u8]>,
        name: &str,
        value: &T,
        what: &str,
        change: crate::backup::Change,
    ) -> Result<()> {
        let _guard = self.lock()?;
        let dir = &self.dir;
        let bytes = serde_json::to_vec(value)
            .map_err(|e| self.corrupt(format!("cannot encode {what}: {e}")))?;
        let txn = self.write_txn()?;
        txn.open_table(table)
            .ctx(dir)?
            .insert(name, seal(&bytes).as_slice())
            .ctx(dir)?;
        self.commit(txn)?;
        self.write_backup(vec![change]);
        Ok(())
    }
}
