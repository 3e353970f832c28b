//! Text output of the read verbs (`--output json` prints the agent's JSON as it is).

use serde_json::Value;

fn s(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        Value::Array(a) => {
            if a.is_empty() {
                "-".into()
            } else {
                a.iter().map(s).collect::<Vec<_>>().join(",")
            }
        }
        other => other.to_string(),
    }
}

pub fn json(v: &Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

pub fn status(v: &Value) {
    if let Value::Object(m) = v {
        for (k, val) in m {
            println!("{k:<16} {}", s(val));
        }
    }
}

pub fn table(v: &Value, columns: &[&str]) {
    let rows: Vec<Vec<String>> = v
        .as_array()
        .map(|a| {
            a.iter()
                .map(|r| columns.iter().map(|c| s(&r[*c])).collect())
                .collect()
        })
        .unwrap_or_default();
    let widths: Vec<usize> = columns
        .iter()
        .enumerate()
        .map(|(i, c)| {
            rows.iter()
                .map(|r| r[i].len())
                .chain([c.len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |cells: Vec<String>| {
        cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ")
    };
    println!(
        "{}",
        line(columns.iter().map(|c| c.to_uppercase()).collect()).trim_end()
    );
    for r in rows {
        println!("{}", line(r).trim_end());
    }
}

pub fn explain(v: &Value) {
    println!("{} ({})", s(&v["verdict"]).to_uppercase(), s(&v["reason"]));
    println!("  {}", s(&v["why"]));
    for k in ["endpoint", "identity", "class", "binding"] {
        if !v[k].is_null() {
            println!("  {k:<9} {}", s(&v[k]));
        }
    }
}

pub fn done(v: &Value) {
    if let Value::Object(m) = v {
        let parts: Vec<String> = m
            .iter()
            .filter(|(_, val)| !val.is_null())
            .map(|(k, val)| format!("{k}={}", s(val)))
            .collect();
        println!("ok: {}", parts.join(" "));
    }
}
