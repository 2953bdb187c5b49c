//! Listing output as `lvs` gives it: columns sized to their content, `--noheadings`,
//! `-o FIELD,...`, `--units` and `--separator`, so that scripts can cut fields reliably.

use std::io::Write;

use anyhow::{Result, bail};
use indicatif::HumanBytes;

/// Options of every listing command.
#[derive(clap::Args, Debug, Clone)]
pub struct TableArgs {
    /// Do not print the heading line.
    #[arg(long)]
    pub noheadings: bool,
    /// Columns to print, comma-separated; `+FIELD,...` adds to the default ones. An unknown
    /// field is a usage error that lists the known ones.
    #[arg(
        short = 'o',
        long = "options",
        value_name = "FIELD,...",
        value_delimiter = ','
    )]
    pub fields: Vec<String>,
    /// Units of sizes: h (human, default), b (bytes), s (512-byte sectors), k m g t (powers of
    /// 1024), K M G T (powers of 1000).
    #[arg(long, default_value = "h", value_parser = parse_units)]
    pub units: Units,
    /// Separate columns with this string instead of aligning them with spaces.
    #[arg(long, value_name = "STRING")]
    pub separator: Option<String>,
}

impl Default for TableArgs {
    /// What a command without listing options prints: headings, default columns, human units.
    fn default() -> TableArgs {
        TableArgs {
            noheadings: false,
            fields: Vec::new(),
            units: Units::Human,
            separator: None,
        }
    }
}

/// How sizes are printed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Units {
    Human,
    Bytes,
    Sectors,
    /// Divisor and suffix.
    Scaled(u64, char),
}

fn parse_units(text: &str) -> Result<Units, String> {
    let unit = match text {
        "h" | "H" => Units::Human,
        "b" | "B" => Units::Bytes,
        "s" | "S" => Units::Sectors,
        "k" => Units::Scaled(1 << 10, 'k'),
        "m" => Units::Scaled(1 << 20, 'm'),
        "g" => Units::Scaled(1 << 30, 'g'),
        "t" => Units::Scaled(1 << 40, 't'),
        "K" => Units::Scaled(1_000, 'K'),
        "M" => Units::Scaled(1_000_000, 'M'),
        "G" => Units::Scaled(1_000_000_000, 'G'),
        "T" => Units::Scaled(1_000_000_000_000, 'T'),
        other => {
            return Err(format!(
                "unknown unit {other:?}: use one of h b s k m g t K M G T"
            ));
        }
    };
    Ok(unit)
}

impl Units {
    pub fn format(self, bytes: u64) -> String {
        match self {
            Units::Human => HumanBytes(bytes).to_string(),
            Units::Bytes => format!("{bytes}B"),
            Units::Sectors => format!("{}S", bytes.div_ceil(512)),
            Units::Scaled(div, suffix) => format!("{:.2}{suffix}", bytes as f64 / div as f64),
        }
    }
}

/// One value of a table.
pub enum Cell {
    Text(String),
    Bytes(u64),
    Count(u64),
    /// No value (printed `-`).
    None,
}

impl Cell {
    fn render(&self, units: Units) -> String {
        match self {
            Cell::Text(text) => text.clone(),
            Cell::Bytes(bytes) => units.format(*bytes),
            Cell::Count(n) => n.to_string(),
            Cell::None => "-".into(),
        }
    }
}

/// A column: its field name (lower case; the heading is its upper case), whether numbers
/// align right, and whether it is shown without `-o`.
pub struct Column {
    pub field: &'static str,
    pub right: bool,
    pub default: bool,
}

pub const fn col(field: &'static str, right: bool, default: bool) -> Column {
    Column {
        field,
        right,
        default,
    }
}

/// Rows of cells in the order of `columns`.
pub struct Table<'a> {
    pub columns: &'a [Column],
    pub rows: Vec<Vec<Cell>>,
}

impl Table<'_> {
    /// The columns `-o` selects, as indexes.
    fn selected(&self, args: &TableArgs) -> Result<Vec<usize>> {
        let defaults = || (0..self.columns.len()).filter(|&i| self.columns[i].default);
        if args.fields.is_empty() {
            return Ok(defaults().collect());
        }
        let mut chosen: Vec<usize> = Vec::new();
        if args.fields.first().is_some_and(|f| f.starts_with('+')) {
            chosen.extend(defaults());
        }
        for field in &args.fields {
            let field = field.trim().trim_start_matches('+').to_ascii_lowercase();
            if field.is_empty() {
                continue;
            }
            match self.columns.iter().position(|c| c.field == field) {
                Some(i) => chosen.push(i),
                None => {
                    let known: Vec<&str> = self.columns.iter().map(|c| c.field).collect();
                    bail!(crate::output::Usage(format!(
                        "-o {field}: no such field; known fields: {}",
                        known.join(",")
                    )));
                }
            }
        }
        Ok(chosen)
    }

    pub fn print(&self, args: &TableArgs, out: &mut dyn Write) -> Result<()> {
        let chosen = self.selected(args)?;
        let mut lines: Vec<Vec<String>> = Vec::new();
        if !args.noheadings {
            lines.push(
                chosen
                    .iter()
                    .map(|&i| self.columns[i].field.to_ascii_uppercase())
                    .collect(),
            );
        }
        for row in &self.rows {
            lines.push(chosen.iter().map(|&i| row[i].render(args.units)).collect());
        }
        if let Some(separator) = &args.separator {
            for line in &lines {
                writeln!(out, "{}", line.join(separator))?;
            }
            return Ok(());
        }
        let widths: Vec<usize> = (0..chosen.len())
            .map(|c| {
                lines
                    .iter()
                    .map(|l| l[c].chars().count())
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        for line in &lines {
            let mut text = String::new();
            for (c, cell) in line.iter().enumerate() {
                if c > 0 {
                    text.push_str("  ");
                }
                let last = c + 1 == line.len();
                let pad = widths[c] - cell.chars().count();
                if self.columns[chosen[c]].right {
                    text.push_str(&" ".repeat(pad));
                    text.push_str(cell);
                } else {
                    text.push_str(cell);
                    if !last {
                        text.push_str(&" ".repeat(pad));
                    }
                }
            }
            writeln!(out, "{text}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const COLUMNS: &[Column] = &[
        col("name", false, true),
        col("size", true, true),
        col("path", false, false),
    ];

    fn args(fields: &[&str]) -> TableArgs {
        TableArgs {
            noheadings: false,
            fields: fields.iter().map(|f| f.to_string()).collect(),
            units: Units::Bytes,
            separator: None,
        }
    }

    fn print(table: &Table, args: &TableArgs) -> String {
        let mut out = Vec::new();
        table.print(args, &mut out).unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn columns_fit_long_names_and_fields_select() {
        let long = "0123456789abcdef0123456789abcdef01234567";
        let table = Table {
            columns: COLUMNS,
            rows: vec![
                vec![Cell::Text(long.into()), Cell::Bytes(4096), Cell::None],
                vec![Cell::Text("a".into()), Cell::Bytes(512), Cell::None],
            ],
        };
        let text = print(&table, &args(&[]));
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[1], format!("{long}  4096B"));
        assert_eq!(lines[2], format!("a{}   512B", " ".repeat(long.len() - 1)));
        let text = print(&table, &args(&["+path"]));
        assert!(text.starts_with("NAME"), "{text}");
        assert!(text.lines().next().unwrap().ends_with("PATH"), "{text}");
        let mut a = args(&["size", "name"]);
        a.separator = Some(":".into());
        a.noheadings = true;
        assert_eq!(print(&table, &a), format!("4096B:{long}\n512B:a\n"));
        assert!(table.print(&args(&["nosuch"]), &mut Vec::new()).is_err());
    }

    #[test]
    fn units_scale_sizes() {
        assert_eq!(parse_units("g").unwrap().format(3 << 29), "1.50g");
        assert_eq!(parse_units("K").unwrap().format(1500), "1.50K");
        assert_eq!(parse_units("s").unwrap().format(4096), "8S");
        assert!(parse_units("x").is_err());
    }
}
