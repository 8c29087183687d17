//! The bench plot: a row of panels per kernel, one panel per page mode,
//! region size against time as a multiple of that kernel's floor (one raw
//! `MAP_DMA`), both axes logarithmic and shared by every panel. SVG, so
//! that no fonts or image libraries are needed to draw it.

use std::path::Path;

use anyhow::{Result, anyhow};
use plotters::prelude::*;

use super::KernelRun;
use super::figures::{MODES, PIN_ONLY_MAX, Results};

/// The plotted series: metric and legend label.
const SERIES: &[(&str, &str)] = &[
    ("numapin.pin-only", "numapin pin only (pin_user)"),
    ("numapin.pin-only.no-node", "pin_user, no node check"),
    (
        "numapin.alloc-pin-verify",
        "numapin allocate+prefault+pin+verify",
    ),
    ("per-page.map", "one MAP_DMA per page"),
    ("uring.register", "io_uring REGISTER_BUFFERS"),
    ("prefault.1-thread", "prefault, 1 thread"),
    ("prefault.node-threads", "prefault, node threads"),
];

const COLORS: [RGBColor; 7] = [
    RGBColor(214, 39, 40),
    RGBColor(255, 127, 14),
    RGBColor(31, 119, 180),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(23, 190, 207),
];

/// (log2 of the size in bytes, ratio to the floor) points of `metric` in
/// `mode`.
fn points(r: &Results, mode: &str, metric: &str) -> Vec<(f64, f64)> {
    r.sizes(mode)
        .into_iter()
        .filter_map(|s| {
            let f = r.get(mode, s, metric)?;
            Some(((s as f64).log2(), r.ratio(f)?))
        })
        .collect()
}

/// An x-axis label: the size at whole powers of two, nothing in between.
fn size_label(log2: f64) -> String {
    if (log2 - log2.round()).abs() > 1e-6 || log2 < 0.0 {
        return String::new();
    }
    super::figures::size_name(1u64 << log2.round() as u32)
}

/// Writes the plot of `runs` to `path`.
pub fn svg(runs: &[KernelRun], path: &Path) -> Result<()> {
    draw(runs, path).map_err(|e| anyhow!("drawing {}: {e}", path.display()))
}

fn draw(runs: &[KernelRun], path: &Path) -> Result<(), Box<dyn std::error::Error>> {
    let rows = runs.len().max(1);
    let root = SVGBackend::new(path, (1500, 40 + 520 * rows as u32)).into_drawing_area();
    root.fill(&WHITE)?;
    let (title, body) = root.split_vertically(40);
    title.draw(&Text::new(
        "numapin: time as a multiple of one raw VFIO_IOMMU_MAP_DMA (same VM run and kernel; median of the rounds' ratios where timed in the floor's rounds, else of medians)",
        (20, 12),
        ("sans-serif", 20),
    ))?;
    let all: Vec<(f64, f64)> = runs
        .iter()
        .flat_map(|run| {
            MODES.iter().flat_map(move |m| {
                SERIES
                    .iter()
                    .flat_map(move |(metric, _)| points(&run.results, m, metric))
            })
        })
        .collect();
    let (xmin, xmax) = all
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.0), b.max(p.0)));
    let (ymin, ymax) = all
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.1), b.max(p.1)));
    let (xmin, xmax) = if all.is_empty() {
        (25.0, 32.0)
    } else {
        (xmin - 0.5, xmax + 0.5)
    };
    let (ymin, ymax) = if all.is_empty() {
        (0.5, 10.0)
    } else {
        ((ymin / 1.5).min(0.5), (ymax * 1.5).max(2.0))
    };
    for (row, (area, run)) in body.split_evenly((rows, 1)).iter().zip(runs).enumerate() {
        panel_row(area, run, row == 0, (xmin, xmax), (ymin, ymax))?;
    }
    root.present()?;
    Ok(())
}

/// One kernel's row: a panel per page mode, the legend in the first
/// panel of the first row.
fn panel_row(
    area: &DrawingArea<SVGBackend, plotters::coord::Shift>,
    run: &KernelRun,
    legend: bool,
    (xmin, xmax): (f64, f64),
    (ymin, ymax): (f64, f64),
) -> Result<(), Box<dyn std::error::Error>> {
    let r = &run.results;
    let panels = area.split_evenly((1, MODES.len()));
    for (i, (panel, mode)) in panels.iter().zip(MODES).enumerate() {
        let mut chart = ChartBuilder::on(panel)
            .caption(
                format!("{mode} on {} ({})", run.label, run.release),
                ("sans-serif", 16),
            )
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(if i == 0 { 60 } else { 40 })
            .build_cartesian_2d(xmin..xmax, (ymin..ymax).log_scale())?;
        chart
            .configure_mesh()
            .light_line_style(WHITE)
            .x_labels((xmax - xmin).ceil() as usize + 1)
            .x_desc("region size")
            .y_desc(if i == 0 { "× floor" } else { "" })
            .x_label_formatter(&|x| size_label(*x))
            .y_label_formatter(&|y| {
                if *y >= 1.0 {
                    format!("{y:.0}")
                } else {
                    format!("{y:.1}")
                }
            })
            .draw()?;
        chart.draw_series(LineSeries::new(
            [(xmin, PIN_ONLY_MAX), (xmax, PIN_ONLY_MAX)],
            BLACK.mix(0.4),
        ))?;
        for ((metric, label), color) in SERIES.iter().zip(COLORS) {
            let pts = points(r, mode, metric);
            if pts.is_empty() {
                continue;
            }
            let series = chart.draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))?;
            if i == 0 && legend {
                series.label(*label).legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
                });
            }
            chart.draw_series(pts.iter().map(|p| Circle::new(*p, 3, color.filled())))?;
        }
        if i == 0 && legend {
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::UpperLeft)
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK.mix(0.3))
                .label_font(("sans-serif", 13))
                .draw()?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_an_svg_with_every_panel() {
        let runs = crate::bench::two_test_runs(0.0105, 0.011);
        let path = std::env::temp_dir().join(format!("numapin-plot-{}.svg", std::process::id()));
        svg(&runs, &path).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert!(text.starts_with("<svg"), "{}", &text[..80.min(text.len())]);
        assert_eq!(size_label(30.0), "1G");
        assert_eq!(size_label(28.5), "");
        for want in [
            "base on 6.1",
            "thp on 7.3",
            "hugetlb-2M",
            "numapin pin only",
            "256M",
        ] {
            assert!(text.contains(want), "no {want:?} in the SVG");
        }
    }
}
