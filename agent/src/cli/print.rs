//! Text output shared by the verbs: key/value records (nested values indented under their
//! key), tables, `ok: key=value` lines; `--output json` re-serialises the reply.

use std::fmt::Display;

use serde::Serialize;
use tollgate::{controller::gpu::GpuReading, tables::Proto};

/// The reply as pretty JSON. Through `serde_json::Value`, so that keys come out sorted, as
/// they always have.
pub fn json<T: Serialize + ?Sized>(v: &T) {
    let v = serde_json::to_value(v).unwrap_or_default();
    println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
}

/// A list as one cell: comma-separated, `-` when empty.
pub fn list<T: Display>(items: &[T]) -> String {
    if items.is_empty() {
        "-".into()
    } else {
        items
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// An optional value as one cell: `-` when absent.
pub fn opt<T: Display>(v: Option<T>) -> String {
    v.map_or_else(|| "-".into(), |v| v.to_string())
}

/// A float as JSON writes it (`1.0`, not `1`), as the text output always showed it.
pub fn float(x: f64) -> String {
    format!("{x:?}")
}

pub fn proto(p: Proto) -> &'static str {
    match p {
        Proto::Tcp => "tcp",
        Proto::Udp => "udp",
    }
}

/// One GPU reading as a line of text (utilisation is a fraction 0..=1 in the reply).
pub fn gpu_label(r: &GpuReading) -> String {
    const GIB: f64 = (1u64 << 30) as f64;
    let util = r.utilization * 100.0;
    let used = r.memory_used_bytes as f64 / GIB;
    let total = r.memory_total_bytes as f64 / GIB;
    let mut s = format!(
        "GPU{} {} {util:>3.0}%  mem {used:.1}/{total:.1} GiB",
        r.index, r.name,
    );
    if let Some(w) = r.power_watts {
        s.push_str(&format!("  {w:.0} W"));
    }
    s
}

/// A value of a [`Record`]: one line, or a nested record whose values may take several lines.
pub enum Field<'a> {
    Line(String),
    Nested(Vec<(&'a str, Vec<String>)>),
}

/// Key/value lines, keys in a 16-wide column (`status`, `identities show`). A nested value
/// is shown under its key, indented, its own keys in a column of their own width, each value
/// of several lines continued under the first:
///
/// ```text
/// gpu
///   source               simulated
///   readings             GPU0 simulated  20%  mem 1.0/80.0 GiB  220 W
///                        GPU1 simulated  20%  mem 1.0/80.0 GiB  220 W
///   saturated_endpoints  -
/// ```
#[derive(Default)]
pub struct Record<'a>(Vec<(&'a str, Field<'a>)>);

impl<'a> Record<'a> {
    pub fn line(mut self, key: &'a str, value: impl Display) -> Record<'a> {
        self.0.push((key, Field::Line(value.to_string())));
        self
    }

    pub fn nested(mut self, key: &'a str, fields: Vec<(&'a str, Vec<String>)>) -> Record<'a> {
        self.0.push((key, Field::Nested(fields)));
        self
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        for (k, field) in &self.0 {
            match field {
                Field::Line(v) => out.push_str(&format!("{k:<16} {v}\n")),
                Field::Nested(fields) => {
                    out.push_str(k);
                    out.push('\n');
                    let w = fields.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
                    for (k, lines) in fields {
                        let mut lines = lines.iter();
                        let first = lines.next().map_or("-", String::as_str);
                        out.push_str(&format!("  {k:<w$}  {first}\n"));
                        for l in lines {
                            out.push_str(&format!("  {:<w$}  {l}\n", ""));
                        }
                    }
                }
            }
        }
        out
    }

    pub fn print(&self) {
        print!("{}", self.render());
    }
}

/// Columns left-aligned two spaces apart, headers upper-cased, trailing blanks trimmed.
/// Widths count characters, not bytes, so that a name with an accent does not shift its row.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let widths: Vec<usize> = headers
        .iter()
        .enumerate()
        .map(|(i, h)| {
            rows.iter()
                .map(|r| r[i].chars().count())
                .chain([h.len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |cells: &[String]| {
        cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_owned()
    };
    let mut out = line(&headers.iter().map(|h| h.to_uppercase()).collect::<Vec<_>>());
    out.push('\n');
    for r in rows {
        out.push_str(&line(r));
        out.push('\n');
    }
    out
}

/// `ok: key=value ...` for the verbs that change something: the reply's fields in key
/// order, absent ones left out.
pub fn done(parts: &[(&str, Option<String>)]) {
    println!("{}", done_line(parts));
}

/// The line [`done`] prints.
pub fn done_line(parts: &[(&str, Option<String>)]) -> String {
    let parts: Vec<String> = parts
        .iter()
        .filter_map(|(k, v)| v.as_ref().map(|v| format!("{k}={v}")))
        .collect();
    format!("ok: {}", parts.join(" "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_nest_and_align() {
        let r = Record::default()
            .line("bindings", 3)
            .nested(
                "gpu",
                vec![
                    ("source", vec!["simulated".into()]),
                    ("readings", vec!["GPU0".into(), "GPU1".into()]),
                    ("saturated_endpoints", vec![]),
                ],
            )
            .line("quarantined", list::<String>(&[]));
        assert_eq!(
            r.render(),
            "bindings         3
gpu
  source               simulated
  readings             GPU0
                       GPU1
  saturated_endpoints  -
quarantined      -
"
        );
    }

    #[test]
    fn cells() {
        assert_eq!(list(&["a", "b"]), "a,b");
        assert_eq!(list::<u8>(&[]), "-");
        assert_eq!(opt(None::<u64>), "-");
        assert_eq!(float(1.0), "1.0");
        assert_eq!(float(0.25), "0.25");
        assert_eq!(
            table(&["id", "name"], &[vec!["1".into(), "model".into()]]),
            "ID  NAME\n1   model\n"
        );
    }
}
