//! What vmarctl prints besides each command's own text: the versioned JSON documents of
//! `--json`, failures as JSON, and the error kind and exit class of a failure.

use std::io::Write;

use anyhow::{Result, bail};
use serde::Serialize;
use serde_json::Value;
use vmar::error::ExitClass;

/// Version of the JSON documents vmarctl prints (`"version"` of each; see docs/json.md).
pub const JSON_VERSION: u32 = 1;

/// A usage error found after parsing (exit status 2, kind `usage`).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Usage(pub String);

/// Whether `e` comes from writing to a closed pipe.
pub fn broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

/// The error kind and exit class of a failure.
pub fn classify(e: &anyhow::Error) -> (String, ExitClass) {
    if let Some(e) = e.downcast_ref::<vmar::Error>() {
        return (kind_of(e), e.exit_class());
    }
    if e.downcast_ref::<Usage>().is_some() {
        return ("usage".into(), ExitClass::Usage);
    }
    ("error".into(), ExitClass::Failed)
}

/// The kind a failure is reported under: vmard's own for its errors.
pub fn kind_of(e: &vmar::Error) -> String {
    match e {
        vmar::Error::Remote { kind, .. } => kind.clone(),
        other => other.kind().to_string(),
    }
}

pub fn print_error_json(kind: &str, message: &str) {
    let doc = serde_json::json!({
        "version": JSON_VERSION,
        "error": {"kind": kind, "message": message},
    });
    let _ = writeln!(std::io::stdout(), "{doc:#}");
}

/// `value` (a JSON object) with `"version"` added: the document one command prints.
pub fn document(value: &impl Serialize) -> Result<Value> {
    let mut value = serde_json::to_value(value)?;
    match value.as_object_mut() {
        Some(map) => {
            map.insert("version".into(), JSON_VERSION.into());
        }
        None => bail!("internal: JSON result is not an object"),
    }
    Ok(value)
}

pub fn print_json(out: &mut dyn Write, value: &impl Serialize) -> Result<()> {
    let text = serde_json::to_string_pretty(&document(value)?)?;
    writeln!(out, "{text}")?;
    Ok(())
}
