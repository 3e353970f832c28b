//! The bench's charts, SVG drawn with plotters: ns per packet against identities for each
//! path (the spread table), and the live-frames comparison. A figure the run did not measure
//! is left out of its chart.

use std::{collections::BTreeMap, path::Path};

use anyhow::anyhow;
use plotters::prelude::*;

const SIZES: [u32; 4] = [1, 10_000, 100_000, 1_000_000];

/// (label, figure key of the path, or two keys whose difference it is).
const PATHS: &[(&str, &str, Option<&str>)] = &[
    ("bound pass", "bound", None),
    ("over-limit drop", "over_limit", None),
    ("unbound drop", "unbound", None),
    ("isolation drop", "isolation", None),
    ("unprotected pass", "unprotected", None),
    ("bare hash lookup (BIND_V6)", "lookup", Some("parse")),
];

fn err(e: impl std::fmt::Display) -> anyhow::Error {
    anyhow!("drawing the chart: {e}")
}

/// ns/packet added over the rotator's no-op, against the number of identities (log scale).
pub fn per_packet(figs: &BTreeMap<String, f64>, path: &Path) -> anyhow::Result<()> {
    let series: Vec<(&str, Vec<(f64, f64)>)> = PATHS
        .iter()
        .map(|(label, key, minus)| {
            let pts = SIZES
                .iter()
                .filter_map(|n| {
                    let v = figs.get(&format!("xdp.spread.{key}.{n}.added_ns"))?;
                    let sub = match minus {
                        Some(m) => *figs.get(&format!("xdp.spread.{m}.{n}.added_ns"))?,
                        None => 0.0,
                    };
                    Some((f64::from(*n), v - sub))
                })
                .collect();
            (*label, pts)
        })
        .filter(|(_, pts): &(&str, Vec<(f64, f64)>)| !pts.is_empty())
        .collect();
    let ymax = series
        .iter()
        .flat_map(|(_, p)| p.iter().map(|(_, y)| *y))
        .fold(10.0f64, f64::max)
        * 1.15;
    let root = SVGBackend::new(path, (800, 480)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "tollgate: ns per packet over the no-op, traffic spread over N identities",
            ("sans-serif", 18),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(56)
        .build_cartesian_2d((0.5f64..2_000_000f64).log_scale(), 0f64..ymax)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("bound identities N (log scale)")
        .y_desc("ns/packet added over the rotator + no-op")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .draw()
        .map_err(err)?;
    for (i, (label, pts)) in series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(pts.iter().copied(), color.stroke_width(2)))
            .map_err(err)?
            .label(*label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color));
        chart
            .draw_series(pts.iter().map(|p| Circle::new(*p, 3, color.filled())))
            .map_err(err)?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .border_style(BLACK)
        .background_style(WHITE.mix(0.8))
        .draw()
        .map_err(err)?;
    root.present().map_err(err)?;
    Ok(())
}

const LIVE: &[(&str, &str)] = &[
    ("empty XDP drop", "empty_drop"),
    ("tollgate unbound drop", "tollgate_unbound"),
    ("XDP pass + nftables set", "nft"),
    ("XDP pass + iptables hashlimit", "iptables"),
    ("empty XDP pass → socket", "empty_pass"),
    ("tollgate bound pass → socket", "tollgate_bound"),
];

/// ns per frame of each live-frames row, as bars.
pub fn live_frames(figs: &BTreeMap<String, f64>, path: &Path) -> anyhow::Result<()> {
    let rows: Vec<(&str, f64)> = LIVE
        .iter()
        .filter_map(|(label, key)| Some((*label, *figs.get(&format!("live.{key}.ns"))?)))
        .collect();
    let ymax = rows.iter().map(|(_, v)| *v).fold(10.0f64, f64::max) * 1.15;
    let root = SVGBackend::new(path, (800, 480)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let n = rows.len().max(1) as f64;
    let labels: Vec<String> = rows.iter().map(|(l, _)| (*l).to_owned()).collect();
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "a flood's cost per frame, live frames (BPF_F_TEST_XDP_LIVE_FRAMES)",
            ("sans-serif", 18),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(56)
        .build_cartesian_2d(0f64..n, 0f64..ymax)
        .map_err(err)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(rows.len().max(1) * 2 + 1)
        .x_label_formatter(&|x| {
            let i = x.floor() as usize;
            // A label at each bar's middle only.
            if (x - x.floor() - 0.5).abs() < 0.01 {
                labels.get(i).cloned().unwrap_or_default()
            } else {
                String::new()
            }
        })
        .y_desc("ns per frame")
        .draw()
        .map_err(err)?;
    chart
        .draw_series(rows.iter().enumerate().map(|(i, (_, v))| {
            let c = if i == 1 || i == 5 {
                RGBColor(200, 60, 40)
            } else {
                RGBColor(90, 110, 160)
            };
            Rectangle::new([(i as f64 + 0.15, 0.0), (i as f64 + 0.85, *v)], c.filled())
        }))
        .map_err(err)?;
    chart
        .draw_series(rows.iter().enumerate().map(|(i, (_, v))| {
            Text::new(
                format!("{v:.0}"),
                (i as f64 + 0.4, *v + ymax * 0.02),
                ("sans-serif", 14),
            )
        }))
        .map_err(err)?;
    root.present().map_err(err)?;
    Ok(())
}
