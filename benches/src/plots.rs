//! The SVG figures under `benches/figures/`: throughput by batch size and relay count, and the
//! commit -> publish latency distribution with and without NOTIFY.

use std::ops::Range;
use std::path::{Path, PathBuf};

use plotters::coord::ranged1d::{AsRangedCoord, ValueFormatter};
use plotters::prelude::*;

use crate::common::{Error, Figures};
use crate::drain::{BATCHES, RELAYS};
use crate::latency::Measured;

pub fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("figures")
}

/// One labelled line of a chart; `markers` puts a dot on every point.
struct Line {
    label: String,
    points: Vec<(f64, f64)>,
    width: u32,
    markers: bool,
}

struct Chart<'a> {
    file: &'a str,
    caption: &'a str,
    x_desc: &'a str,
    y_desc: &'a str,
    legend: SeriesLabelPosition,
}

fn draw<X>(chart: Chart<'_>, x: X, y: Range<f64>, lines: &[Line]) -> Result<PathBuf, Error>
where
    X: AsRangedCoord<Value = f64>,
    X::CoordDescType: ValueFormatter<f64>,
{
    let path = dir().join(chart.file);
    {
        let root = SVGBackend::new(&path, (860, 500)).into_drawing_area();
        root.fill(&WHITE)?;
        let mut context = ChartBuilder::on(&root)
            .caption(chart.caption, ("sans-serif", 20))
            .margin(15)
            .x_label_area_size(40)
            .y_label_area_size(70)
            .build_cartesian_2d(x, y)?;
        context
            .configure_mesh()
            .x_desc(chart.x_desc)
            .y_desc(chart.y_desc)
            .draw()?;
        let colors = [BLUE, RED, GREEN, MAGENTA, CYAN, BLACK];
        for (i, line) in lines.iter().enumerate() {
            let color = colors[i % colors.len()];
            let style = color.stroke_width(line.width);
            context
                .draw_series(LineSeries::new(line.points.clone(), style))?
                .label(line.label.as_str())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style));
            if line.markers {
                context.draw_series(
                    line.points
                        .iter()
                        .map(|p| Circle::new(*p, 4, color.filled())),
                )?;
            }
        }
        context
            .configure_series_labels()
            .position(chart.legend)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()?;
        root.present()?;
    }
    Ok(path)
}

pub fn throughput(figures: &Figures) -> Result<PathBuf, Error> {
    let mut lines: Vec<Line> = RELAYS
        .iter()
        .map(|relays| Line {
            label: format!("waybill relay, {relays} relay(s)"),
            points: BATCHES
                .iter()
                .filter_map(|b| {
                    figures
                        .get(&format!("relay_msgs_per_s_b{b}_r{relays}"))
                        .map(|r| (*b as f64, r))
                })
                .collect(),
            width: 2,
            markers: true,
        })
        .collect();
    // Same-run references, measured at batch 1000, drawn flat across the batch sizes.
    for (label, key) in [
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
    ] {
        if let Some(value) = figures.get(key) {
            lines.push(Line {
                label: label.into(),
                points: vec![(50.0, value), (1050.0, value)],
                width: 1,
                markers: false,
            });
        }
    }
    let top = lines
        .iter()
        .flat_map(|l| l.points.iter().map(|(_, y)| *y))
        .fold(1.0, f64::max)
        * 1.15;
    let chart = Chart {
        file: "relay-throughput.svg",
        caption: "Relay drain to a no-op publisher, PostgreSQL (msg/s)",
        x_desc: "batch size",
        y_desc: "messages per second",
        legend: SeriesLabelPosition::UpperLeft,
    };
    draw(chart, 0f64..1100f64, 0f64..top, &lines)
}

pub fn latency(notify: &Measured, polling: &Measured) -> Result<PathBuf, Error> {
    // At most about 500 points per line: the SVG stays small, the curve the same.
    let cdf = |label: &str, measured: &Measured| {
        let n = measured.sorted_ms.len().max(1);
        let step = (n / 500).max(1);
        let points = measured
            .sorted_ms
            .iter()
            .enumerate()
            .filter(|(i, _)| i % step == 0 || i + 1 == n)
            .map(|(i, ms)| (ms.max(0.1), (i + 1) as f64 / n as f64))
            .collect();
        Line {
            label: label.into(),
            points,
            width: 2,
            markers: false,
        }
    };
    let lines = [
        cdf("NOTIFY wake-ups", notify),
        cdf("NOTIFY off, poll interval 100 ms", polling),
    ];
    let max = notify
        .sorted_ms
        .iter()
        .chain(&polling.sorted_ms)
        .fold(1.0f64, |a, b| a.max(*b));
    let chart = Chart {
        file: "latency-cdf.svg",
        caption: "Commit -> publish latency at 1,000 msg/s offered (CDF)",
        x_desc: "milliseconds from commit to publish (log scale)",
        y_desc: "fraction of messages",
        legend: SeriesLabelPosition::LowerRight,
    };
    draw(chart, (0.1f64..max * 1.2).log_scale(), 0f64..1f64, &lines)
}
