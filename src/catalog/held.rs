//! What [`crate::holds`] asks of the catalog: the content fingerprint of a file and of a
//! captured image, an image's identity recorded anew, and the images redirecting into one.

use super::{CatalogContext, IMAGES, REFS};
use crate::error::Result;
use crate::image::{ImageFile, ImageIdentity};
use crate::map::ImageId;
use crate::records::{Fingerprint, ImageRecord, fingerprint};
use crate::scan::hash_image;

use super::Catalog;

impl Catalog {
    /// The content fingerprint of `image` as it reads now (hashes all of it).
    pub fn content_fingerprint(&self, image: &ImageFile) -> Result<String> {
        let mut print = Fingerprint::new(image.size);
        hash_image(image, &mut |_, _| {}, &mut |records| {
            for (block, digest) in records {
                print.push(*block, digest);
            }
            Ok(())
        })?;
        Ok(print.finish())
    }

    /// The fingerprint of `record` as captured: its own, or for records from before
    /// fingerprints, from its stored digests.
    pub fn captured_fingerprint(&self, record: &ImageRecord) -> Result<String> {
        if let Some(print) = &record.fingerprint {
            return Ok(print.clone());
        }
        let digests = self.digest_list(record)?;
        Ok(fingerprint(record.size, &digests))
    }

    /// Records `identity` as image `id`'s: only once its content was proven the captured
    /// one (see [`crate::holds`]).
    pub fn set_identity(&self, id: ImageId, identity: ImageIdentity) -> Result<ImageRecord> {
        let _guard = self.lock()?;
        let txn = self.write_txn()?;
        let mut record = self.record_in(&txn, id)?;
        record.identity = identity;
        self.write_record(&txn, &record)?;
        self.commit(txn)?;
        self.write_backup(vec![crate::backup::Change::Image {
            record: Box::new(record.clone()),
        }]);
        Ok(record)
    }

    /// Images whose maps redirect into image `id`, in id order.
    pub fn images_redirecting_to(&self, id: ImageId) -> Result<Vec<ImageId>> {
        let dir = &self.dir;
        let txn = self.read_txn()?;
        let refs = txn.open_table(REFS).ctx(dir)?;
        let mut ids = Vec::new();
        for entry in refs.range((id, 0)..=(id, u32::MAX)).ctx(dir)? {
            let other = entry.ctx(dir)?.0.value().1;
            if other != id {
                ids.push(other);
            }
        }
        // Only images that exist (the table is kept in step; this is cheap insurance).
        let images = txn.open_table(IMAGES).ctx(dir)?;
        let mut out = Vec::new();
        for other in ids {
            if images.get(other).ctx(dir)?.is_some() {
                out.push(other);
            }
        }
        Ok(out)
    }
}
