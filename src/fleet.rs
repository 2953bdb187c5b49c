//! Same maps on every host: the fleet manifest (the images every host captures, in one
//! order), the per-host report each host writes beside it, and their comparison. Pure: no
//! file system, no socket (vmarctl reads and writes the files).
//!
//! Manifest: one image a line, `PATH [NAME]`, `#` comments and blank lines ignored; a
//! relative path is taken from the manifest's directory, so hosts that mount the share at
//! different places read the same manifest. Report (`MANIFEST.hosts/HOST`): one line per
//! image, `NAME FINGERPRINT MAP-FINGERPRINT`, in manifest order.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::map::{Extent, Source};

/// One image of a manifest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub path: PathBuf,
    pub name: Option<String>,
}

/// Parses a manifest; `base` is its directory. Errors name the line.
pub fn parse_manifest(text: &str, base: &Path) -> Result<Vec<Entry>, String> {
    let mut entries = Vec::new();
    for (number, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let mut words = line.split_whitespace();
        let path = words.next().unwrap_or_default();
        let name = words.next().map(str::to_string);
        if words.next().is_some() {
            return Err(format!(
                "line {}: expected `PATH [NAME]`, got {line:?}",
                number + 1
            ));
        }
        entries.push(Entry {
            path: base.join(path),
            name,
        });
    }
    if entries.is_empty() {
        return Err("the manifest lists no image".into());
    }
    Ok(entries)
}

/// Fingerprint of a map, comparable across hosts: BLAKE3 (key-derivation mode) over the
/// block count and every extent (start, length, kind, and for a redirect the target's
/// content fingerprint and block; image ids are local to a catalog). Equal on two hosts
/// when their maps serve every block from the same content at the same place.
pub fn map_fingerprint(
    blocks: u64,
    extents: &[Extent],
    fingerprint_of: &dyn Fn(u32) -> Option<String>,
) -> String {
    let mut hasher = blake3::Hasher::new_derive_key("vmar 2026 map fingerprint v1");
    hasher.update(&blocks.to_le_bytes());
    for extent in extents {
        hasher.update(&extent.start.to_le_bytes());
        hasher.update(&extent.len.to_le_bytes());
        match extent.source {
            Source::Zero => {
                hasher.update(b"z");
            }
            Source::Own => {
                hasher.update(b"o");
            }
            Source::Redirect { image, block } => {
                let target = fingerprint_of(image).unwrap_or_else(|| format!("id:{image}"));
                hasher.update(b"r");
                hasher.update(&(target.len() as u64).to_le_bytes());
                hasher.update(target.as_bytes());
                hasher.update(&block.to_le_bytes());
            }
        }
    }
    format!("blake3:{}", hasher.finalize().to_hex())
}

/// One line of a host's report.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Line {
    pub name: String,
    pub fingerprint: String,
    pub map: String,
}

pub fn format_report(lines: &[Line]) -> String {
    lines
        .iter()
        .map(|l| format!("{} {} {}\n", l.name, l.fingerprint, l.map))
        .collect()
}

pub fn parse_report(text: &str) -> Result<Vec<Line>, String> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .enumerate()
        .map(|(i, l)| {
            let words: Vec<&str> = l.split_whitespace().collect();
            match words.as_slice() {
                [name, fingerprint, map] => Ok(Line {
                    name: name.to_string(),
                    fingerprint: fingerprint.to_string(),
                    map: map.to_string(),
                }),
                _ => Err(format!("line {}: expected `NAME FINGERPRINT MAP`", i + 1)),
            }
        })
        .collect()
}

/// How one image stands across the fleet.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ImageStatus {
    pub name: String,
    /// Same fingerprint and map fingerprint on every host that reported, and every host has it.
    pub same: bool,
    /// Host -> (fingerprint, map fingerprint); `None` when the host did not report it.
    pub hosts: BTreeMap<String, Option<(String, String)>>,
}

/// Compares the hosts' reports image by image, in the order of the first report that names
/// each (the manifest's, when hosts followed it).
pub fn compare(reports: &BTreeMap<String, Vec<Line>>) -> Vec<ImageStatus> {
    let mut order: Vec<String> = Vec::new();
    for lines in reports.values() {
        for line in lines {
            if !order.contains(&line.name) {
                order.push(line.name.clone());
            }
        }
    }
    order
        .into_iter()
        .map(|name| {
            let hosts: BTreeMap<String, Option<(String, String)>> = reports
                .iter()
                .map(|(host, lines)| {
                    let found = lines
                        .iter()
                        .find(|l| l.name == name)
                        .map(|l| (l.fingerprint.clone(), l.map.clone()));
                    (host.clone(), found)
                })
                .collect();
            let mut values = hosts.values();
            let first = values.next().cloned().flatten();
            let same = first.is_some() && values.all(|v| *v == first);
            ImageStatus { name, same, hosts }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifests_parse_with_names_comments_and_relative_paths() {
        let text = "# fleet\nbase.raw base\n\n/abs/web.raw   # web\n";
        let entries = parse_manifest(text, Path::new("/share")).unwrap();
        assert_eq!(
            entries,
            vec![
                Entry {
                    path: "/share/base.raw".into(),
                    name: Some("base".into())
                },
                Entry {
                    path: "/abs/web.raw".into(),
                    name: None
                },
            ]
        );
        assert!(parse_manifest("a b c\n", Path::new("/")).is_err());
        assert!(parse_manifest("# nothing\n", Path::new("/")).is_err());
    }

    #[test]
    fn map_fingerprints_follow_content_not_ids() {
        let extents = |image| {
            vec![
                Extent {
                    start: 0,
                    len: 2,
                    source: Source::Own,
                },
                Extent {
                    start: 2,
                    len: 3,
                    source: Source::Redirect { image, block: 7 },
                },
            ]
        };
        // Same target content under different local ids: same fingerprint.
        let a = map_fingerprint(5, &extents(1), &|_| Some("blake3:aa".into()));
        let b = map_fingerprint(5, &extents(9), &|_| Some("blake3:aa".into()));
        assert_eq!(a, b);
        // Another target content, another block or another extent: different.
        assert_ne!(
            a,
            map_fingerprint(5, &extents(1), &|_| Some("blake3:bb".into()))
        );
        let mut moved = extents(1);
        moved[1].source = Source::Redirect { image: 1, block: 8 };
        assert_ne!(a, map_fingerprint(5, &moved, &|_| Some("blake3:aa".into())));
        moved[1].source = Source::Own;
        assert_ne!(a, map_fingerprint(5, &moved, &|_| Some("blake3:aa".into())));
    }

    #[test]
    fn reports_round_trip_and_differences_are_found() {
        let line = |name: &str, f: &str, m: &str| Line {
            name: name.into(),
            fingerprint: f.into(),
            map: m.into(),
        };
        let a = vec![line("base", "f1", "m1"), line("web", "f2", "m2")];
        assert_eq!(parse_report(&format_report(&a)).unwrap(), a);
        assert!(parse_report("x y\n").is_err());
        let mut reports = BTreeMap::new();
        reports.insert("a".to_string(), a.clone());
        reports.insert("b".to_string(), a.clone());
        assert!(compare(&reports).iter().all(|s| s.same));
        reports.insert("c".to_string(), vec![line("base", "f1", "m9")]);
        let status = compare(&reports);
        assert_eq!(status.len(), 2);
        assert!(!status[0].same, "another map on c");
        assert!(!status[1].same, "web missing on c");
        assert_eq!(status[1].hosts["c"], None);
    }
}
