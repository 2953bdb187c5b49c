//! Capture: what capturing an image would do (decide), hashing it or importing its
//! sidecar, resolving its blocks against the index, and staging and committing its entry
//! (record, digest list, index run, map).

use super::*;

/// What a capture did.
pub struct Captured {
    pub record: ImageRecord,
    pub status: CaptureStatus,
    /// Other images whose maps changed (a re-capture: they read from the old version).
    pub changed: Vec<String>,
    /// What was done with the image's digest sidecar, when sidecars are on.
    pub sidecar: Option<SidecarReport>,
}

impl Captured {
    fn unchanged(record: ImageRecord) -> Captured {
        Captured {
            record,
            status: CaptureStatus::Unchanged,
            changed: Vec::new(),
            sidecar: None,
        }
    }
}

/// What a capture does, decided from the catalog as it is.
enum Decision {
    /// The same version of the image is captured already.
    Unchanged(Box<ImageRecord>),
    /// Capture it with this id and name.
    Capture(ImageId, String, CaptureStatus),
}

impl Catalog {
    /// What capturing `image` (as `name`) would do now.
    fn decide(&self, image: &ImageFile, name: Option<&str>, recapture: bool) -> Result<Decision> {
        let existing = self.image_at(&image.path)?;
        Ok(match existing {
            Some(record) => {
                if let Some(wanted) = name
                    && wanted != record.name
                {
                    return Err(Error::AlreadyCaptured {
                        name: record.name,
                        path: record.path,
                    });
                }
                if record.identity == image.identity {
                    return Ok(Decision::Unchanged(Box::new(record)));
                }
                if !recapture {
                    return Err(Error::ImageChanged {
                        what: record.identity.describe_change(&image.identity),
                        name: record.name,
                        path: record.path,
                    });
                }
                // A new map under a live device would serve other bytes than its table.
                if let Some(devices) = self.images_in_use()?.remove(&record.name) {
                    return Err(Error::ImageInUse {
                        name: record.name,
                        devices,
                    });
                }
                Decision::Capture(record.id, record.name, CaptureStatus::Recaptured)
            }
            None => {
                let name = match name {
                    Some(name) => name.to_string(),
                    None => default_name(&image.path),
                };
                validate_name(&name)?;
                match self.image(&name) {
                    Ok(other) => {
                        return Err(Error::NameTaken {
                            name,
                            path: other.path,
                        });
                    }
                    Err(Error::UnknownImage { .. }) => {}
                    Err(e) => return Err(e),
                }
                Decision::Capture(
                    ImageId::try_from(self.meta(NEXT_ID)?)
                        .map_err(|_| self.corrupt("all image ids are used".into()))?,
                    name,
                    CaptureStatus::Captured,
                )
            }
        })
    }

    /// Captures `image`: hashes it, records its digests and map. See [`CaptureStatus`] for
    /// what happens when the image is already in the catalog. `progress` is called as bytes
    /// are read.
    pub fn capture(
        &self,
        image: &ImageFile,
        name: Option<&str>,
        recapture: bool,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<(ImageRecord, CaptureStatus)> {
        let captured = self.capture_changing(image, name, recapture, progress)?;
        Ok((captured.record, captured.status))
    }

    /// [`Catalog::capture`], also naming the other images whose maps a re-capture changed.
    pub fn capture_changing(
        &self,
        image: &ImageFile,
        name: Option<&str>,
        recapture: bool,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<Captured> {
        if let Some(name) = name {
            validate_name(name)?;
        }
        // Checked before hashing, to fail early, and again under the lock: other captures
        // hash and commit meanwhile (hashing takes no lock, so captures and device changes
        // never wait for each other's hashing), and what was checked may have changed.
        if let Decision::Unchanged(record) = self.decide(image, name, recapture)? {
            return Ok(Captured::unchanged(*record));
        }
        let started = std::time::Instant::now();
        let mut spill = self.spill()?;
        let (scan, hashed, writer, mut sidecar) = self.digests_of(image, &mut spill, progress)?;
        let hashed_at = started.elapsed();
        fault::point(fault::Step::CaptureHashed)?;
        let now = image.current_identity()?;
        if now != image.identity {
            return Err(Error::ChangedDuringCapture {
                path: image.path.clone(),
                what: image.identity.describe_change(&now),
            });
        }
        if let (Some(writer), Some(report)) = (writer, sidecar.as_mut()) {
            match writer.commit(&hashed.fingerprint) {
                Ok(_) => report.written = true,
                Err(e) => {
                    tracing::warn!(image = %image.path.display(), "sidecar not written: {e}");
                    report.write_error = Some(e);
                }
            }
        }
        // Changes are serialised: what is checked here stays true until this one commits.
        let mut runs = self.lock()?;
        let (id, name, status) = match self.decide(image, name, recapture)? {
            Decision::Unchanged(record) => return Ok(Captured::unchanged(*record)),
            Decision::Capture(id, name, status) => (id, name, status),
        };
        let mut record = ImageRecord {
            id,
            name,
            path: image.path.clone(),
            size: image.size,
            identity: image.identity,
            captured_at: now_secs(),
            scan,
            summary: MapSummary::default(),
            fingerprint: Some(hashed.fingerprint.clone()),
        };
        let txn = self.write_txn()?;
        let mut dead = self.dead()?;
        let mut changed = Vec::new();
        let mut backup_changes = Vec::new();
        let mut forgot_run = false;
        if status == CaptureStatus::Recaptured {
            // A new version of an image is a new capture: the old version is forgotten (its
            // contents move to their next copies, as `forget` does) and the new one is
            // resolved after every other image, in the same transaction. The cost follows
            // the images that read from it, not the catalog's size.
            let old = self.image_by_id(id)?;
            let removal = self.forget_in(&txn, &old)?;
            changed = removal.changed;
            backup_changes.push(crate::backup::Change::ForgetImage { id: old.id });
            dead.insert(old.id);
            record.id = u32::try_from(self.meta_in(&txn, NEXT_ID)?)
                .map_err(|_| self.corrupt("image ids exhausted".into()))?;
            if let Some(run) = removal.run {
                runs.push(run);
                forgot_run = true;
            }
        }
        let staged = self.stage_capture(&txn, &mut spill, &mut record, hashed, &runs, &dead);
        let staged_at = started.elapsed();
        let committed = staged.and_then(|run| match self.commit(txn) {
            Ok(()) => Ok(run),
            Err(e) => {
                self.remove_runs(vec![run]);
                Err(e)
            }
        });
        let run = match committed {
            Ok(run) => run,
            Err(e) => {
                if forgot_run {
                    self.remove_runs(runs.pop().into_iter().collect());
                }
                return Err(e);
            }
        };
        runs.push(run);
        if status == CaptureStatus::Recaptured {
            // The old version's list: its image is gone with this commit.
            self.remove_list(id);
        }
        backup_changes.push(crate::backup::Change::Image {
            record: Box::new(record.clone()),
        });
        self.write_backup(backup_changes);
        tracing::debug!(
            image = %record.name,
            hashed = ?hashed_at,
            staged = ?staged_at,
            committed = ?started.elapsed(),
            spill = spill.records(),
            changed = changed.len(),
            "captured"
        );
        Ok(Captured {
            record,
            status,
            changed,
            sidecar,
        })
    }

    /// The digests of `image`: imported from its sidecar when one is valid, else hashed
    /// (with a new sidecar being written alongside when this host writes them). Both paths
    /// feed the same collector, so the catalog entry is the same either way.
    #[allow(clippy::type_complexity)]
    fn digests_of(
        &self,
        image: &ImageFile,
        spill: &mut Spill,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<(
        crate::scan::ScanStats,
        Hashed,
        Option<SidecarWriter>,
        Option<SidecarReport>,
    )> {
        let sidecars = self.sidecars().filter(|_| !image.is_block_device);
        let mut report = None;
        if let Some(sidecars) = &sidecars {
            let mut r = SidecarReport {
                path: sidecars.path_for(&image.path).unwrap_or_default(),
                ..SidecarReport::default()
            };
            // The sidecar's decoder fingerprints the records it hands over (it checks the
            // sidecar's own fingerprint with them): the same bytes as a hashing capture's
            // collector would, so the catalog entry is the same either way.
            let mut collector = spill.digests_fingerprinted(image.size, &self.index_dir)?;
            progress(Progress {
                done: 0,
                total: image.size,
            });
            let started = std::time::Instant::now();
            match sidecars.import(image, &mut |records| collector.extend_encoded(records)) {
                Ok(imported) => {
                    let read = started.elapsed();
                    let hashed = collector.finish_with(imported.fingerprint)?;
                    tracing::debug!(read = ?read, sorted = ?started.elapsed(), "sidecar imported");
                    progress(Progress {
                        done: image.size,
                        total: image.size,
                    });
                    r.imported = true;
                    r.sampled_blocks = imported.sampled_blocks;
                    tracing::info!(
                        image = %image.path.display(),
                        sidecar = %r.path.display(),
                        sampled = imported.sampled_blocks,
                        "digests imported from the sidecar"
                    );
                    return Ok((imported.scan, hashed, None, Some(r)));
                }
                Err(refusal) if refusal.kind == "absent" => {}
                Err(refusal) => {
                    tracing::warn!(
                        image = %image.path.display(),
                        sidecar = %r.path.display(),
                        "sidecar refused, hashing the image: {refusal}"
                    );
                    r.refused = Some(refusal.to_string());
                }
            }
            report = Some(r);
        }
        let mut writer = match (&sidecars, report.as_mut()) {
            (Some(sidecars), Some(report)) if sidecars.writes() => match sidecars.writer(image) {
                Ok(writer) => Some(writer),
                Err(e) => {
                    tracing::warn!(image = %image.path.display(), "sidecar not written: {e}");
                    report.write_error = Some(e);
                    None
                }
            },
            _ => None,
        };
        let mut collector = spill.digests(image.size, &self.index_dir)?;
        let scan = hash_image(
            image,
            &mut |done, total| progress(Progress { done, total }),
            &mut |records| {
                if let Some(writer) = writer.as_mut() {
                    writer.push(records);
                }
                collector.extend(records)
            },
        )?;
        Ok((scan, collector.finish()?, writer, report))
    }

    /// Resolves a hashed image against the index and stages it in `txn`: its digests, map,
    /// references, record and counters, and its new index run (synced while the transaction
    /// is filled: it must be durable before the commit that names it).
    fn stage_capture(
        &self,
        txn: &WriteTransaction,
        spill: &mut Spill,
        record: &mut ImageRecord,
        hashed: Hashed,
        runs: &[Run],
        dead: &BTreeSet<ImageId>,
    ) -> Result<Run> {
        let started = std::time::Instant::now();
        let run_id = self.meta_in(txn, NEXT_RUN)?;
        let Hashed {
            sorted,
            mut blocks,
            nonzero,
            ..
        } = hashed;
        let (writer, map) =
            self.resolve_image(spill, record, (sorted, &nonzero), (runs, dead), run_id)?;
        let resolved = started.elapsed();
        record.summary = map.summary(record.size);
        let record = &*record;
        // The run and the digest list are synced while the transaction is filled; both
        // must be durable before the commit that names them.
        let list = digests::list_path(&self.index_dir, record.id);
        let (run, persisted, filled) = std::thread::scope(|scope| {
            let syncer = scope.spawn(|| writer.finish());
            let lister = scope.spawn(|| blocks.persist(&list));
            let filled = self.fill_capture(txn, run_id, &map, record);
            let run = syncer
                .join()
                .map_err(|_| self.corrupt("index writer panicked".into()));
            let persisted = lister
                .join()
                .map_err(|_| self.corrupt("digest list writer panicked".into()));
            (run, persisted, filled)
        });
        let run = match run? {
            Ok(run) => run,
            Err(e) => {
                if matches!(persisted, Ok(Ok(()))) {
                    self.remove_list(record.id);
                }
                return Err(e);
            }
        };
        let synced = started.elapsed();
        let staged = persisted
            .and_then(|p| p)
            .and(filled)
            .and_then(|()| self.name_run(txn, &run));
        tracing::debug!(
            image = %record.name,
            resolved = ?resolved,
            synced = ?synced,
            named = ?started.elapsed(),
            "staged"
        );
        match staged {
            Ok(()) => Ok(run),
            Err(e) => {
                self.remove_runs(vec![run]);
                self.remove_list(record.id);
                Err(e)
            }
        }
    }

    /// Resolves an image's digests (sorted by digest, and by block) against `runs` (skipping
    /// entries of `dead` images): writes its new contents as run `run_id`
    /// (left unsynced: the caller finishes it) and builds its map. Memory stays within the
    /// spill's bound whatever the image's size.
    pub(super) fn resolve_image(
        &self,
        spill: &mut Spill,
        record: &ImageRecord,
        (sorted, nonzero): (crate::spill::SortedDigests, &[(u64, u64)]),
        (runs, dead): (&[Run], &BTreeSet<ImageId>),
        run_id: u64,
    ) -> Result<(RunWriter, BlockMap)> {
        let started = std::time::Instant::now();
        let mut writer = RunWriter::create(&self.index_dir, run_id)?;
        let mut redirects = spill.redirects()?;
        index::resolve(
            record.id,
            sorted,
            runs,
            dead,
            |entry| writer.push(entry),
            |redirect| redirects.push(redirect),
        )?;
        let looked_up = started.elapsed();
        let map = build_map(record, nonzero, redirects.finish()?, spill.path())?;
        tracing::debug!(image = %record.name, looked_up = ?looked_up, mapped = ?started.elapsed(), "resolved");
        Ok((writer, map))
    }

    /// Puts a new image's map, references, record and counters into `txn` (its digests are
    /// in its digest list, [`crate::digests`]).
    fn fill_capture(
        &self,
        txn: &WriteTransaction,
        run_id: u64,
        map: &BlockMap,
        record: &ImageRecord,
    ) -> Result<()> {
        let dir = &self.dir;
        self.write_map(txn, map)?;
        self.add_refs(txn, map)?;
        self.write_record(txn, record)?;
        let mut meta = txn.open_table(META).ctx(dir)?;
        meta.insert(NEXT_ID, u64::from(record.id) + 1).ctx(dir)?;
        meta.insert(NEXT_RUN, run_id + 1).ctx(dir)?;
        Ok(())
    }
}

/// The map of an image from its non-zero blocks and the redirects among them (both in block
/// order): a non-zero block no redirect names is the image's own.
fn build_map(
    record: &ImageRecord,
    nonzero: &[(u64, u64)],
    redirects: SortedRedirects,
    spill_dir: &Path,
) -> Result<BlockMap> {
    let mut builder = MapBuilder::new(record.id, record.size.div_ceil(BLOCK_SIZE));
    let mut redirects = redirects.peekable();
    let stray = |block: u64| Error::Catalog {
        dir: spill_dir.to_path_buf(),
        message: format!("redirect of block {block} that is not a non-zero block (this is a bug)"),
    };
    for &(start, len) in nonzero {
        let end = start + len;
        let mut at = start;
        while let Some(redirect) = redirects.next_if(|r| r.as_ref().map_or(true, |r| r.block < end))
        {
            let redirect = redirect?;
            if redirect.block < at {
                return Err(stray(redirect.block));
            }
            if redirect.block > at {
                builder.push(at, redirect.block - at, Source::Own);
            }
            builder.push(redirect.block, 1, redirect.source());
            at = redirect.block + 1;
        }
        if end > at {
            builder.push(at, end - at, Source::Own);
        }
    }
    if let Some(next) = redirects.next() {
        return Err(stray(next?.block));
    }
    Ok(builder.finish())
}
