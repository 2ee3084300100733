//! The SVG figures under `benches/figures/`: throughput by batch size and relay count, and the
//! commit -> publish latency distribution with and without NOTIFY.

use std::path::{Path, PathBuf};

use plotters::prelude::*;

use crate::common::{Error, Figures};
use crate::drain::{BATCHES, RELAYS};
use crate::latency::Measured;

pub fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("figures")
}

pub fn throughput(figures: &Figures) -> Result<PathBuf, Error> {
    let path = dir().join("relay-throughput.svg");
    let series: Vec<(String, Vec<(f64, f64)>)> = RELAYS
        .iter()
        .map(|relays| {
            let points = BATCHES
                .iter()
                .filter_map(|b| {
                    figures
                        .get(&format!("relay_msgs_per_s_b{b}_r{relays}"))
                        .map(|r| (*b as f64, r))
                })
                .collect();
            (format!("waybill relay, {relays} relay(s)"), points)
        })
        .collect();
    // Same-run references drawn as flat lines across the batch sizes.
    let references: Vec<(String, f64)> = [
        (
            "SQL floor: batched DELETE .. RETURNING, batch 1000",
            "floor_delete_rows_per_s",
        ),
        (
            "SQL floor: batched UPDATE-mark, batch 1000",
            "floor_update_rows_per_s",
        ),
        ("oxide-outbox 0.6, batch 1000", "oxide_outbox_msgs_per_s"),
        ("naive relay (one row per transaction)", "naive_msgs_per_s"),
    ]
    .iter()
    .filter_map(|(label, key)| figures.get(key).map(|v| (label.to_string(), v)))
    .collect();
    let top = series
        .iter()
        .flat_map(|(_, p)| p.iter().map(|(_, y)| *y))
        .chain(references.iter().map(|(_, v)| *v))
        .fold(1.0, f64::max)
        * 1.15;

    let root = SVGBackend::new(&path, (860, 500)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Relay drain to a no-op publisher, PostgreSQL (msg/s)",
            ("sans-serif", 20),
        )
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..1100f64, 0f64..top)?;
    chart
        .configure_mesh()
        .x_desc("batch size")
        .y_desc("messages per second")
        .draw()?;
    let colors = [BLUE, RED, GREEN, MAGENTA, CYAN, BLACK];
    for (i, (label, points)) in series.iter().enumerate() {
        let color = colors[i % colors.len()];
        chart
            .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))?
            .label(label.as_str())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        chart.draw_series(points.iter().map(|p| Circle::new(*p, 4, color.filled())))?;
    }
    for (i, (label, value)) in references.iter().enumerate() {
        let color = colors[(i + series.len()) % colors.len()];
        chart
            .draw_series(LineSeries::new(
                vec![(50.0, *value), (1050.0, *value)],
                color.stroke_width(1),
            ))?
            .label(label.as_str())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(1))
            });
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    drop(chart);
    drop(root);
    Ok(path)
}

pub fn latency(notify: &Measured, polling: &Measured) -> Result<PathBuf, Error> {
    let path = dir().join("latency-cdf.svg");
    let max = notify
        .sorted_ms
        .iter()
        .chain(&polling.sorted_ms)
        .fold(1.0f64, |a, b| a.max(*b));
    let root = SVGBackend::new(&path, (860, 500)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Commit -> publish latency at 1,000 msg/s offered (CDF)",
            ("sans-serif", 20),
        )
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d((0.1f64..max * 1.2).log_scale(), 0f64..1f64)?;
    chart
        .configure_mesh()
        .x_desc("milliseconds from commit to publish (log scale)")
        .y_desc("fraction of messages")
        .draw()?;
    for (label, measured, color) in [
        ("NOTIFY wake-ups", notify, BLUE),
        ("NOTIFY off, poll interval 100 ms", polling, RED),
    ] {
        let n = measured.sorted_ms.len().max(1) as f64;
        let points: Vec<(f64, f64)> = measured
            .sorted_ms
            .iter()
            .enumerate()
            .map(|(i, ms)| (ms.max(0.1), (i + 1) as f64 / n))
            .collect();
        chart
            .draw_series(LineSeries::new(points, color.stroke_width(2)))?
            .label(label)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    drop(chart);
    drop(root);
    Ok(path)
}
