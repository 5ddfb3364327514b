//! An SVG picture of one run: traffic share per group (top) and client p99
//! against the SLO (bottom), fault windows shaded.

use super::engine::SimRun;
use super::scenario::Scenario;
use plotters::prelude::*;

const COLORS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

type Area<'a> = DrawingArea<SVGBackend<'a>, plotters::coord::Shift>;

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

/// Renders the chart as SVG text.
pub fn svg(sc: &Scenario, run: &SimRun, title: &str) -> Result<String, String> {
    let mut out = String::new();
    {
        let root = SVGBackend::with_string(&mut out, (1000, 640)).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let (top, bottom) = root.split_vertically(340);
        shares(&top, sc, run, title)?;
        latency(&bottom, sc, run)?;
        root.present().map_err(err)?;
    }
    Ok(out)
}

/// Fault windows, shaded, from 0 up to `height`.
fn fault_windows(sc: &Scenario, height: f64) -> impl Iterator<Item = Rectangle<(f64, f64)>> + '_ {
    let end = sc.duration.as_secs_f64();
    sc.faults.iter().map(move |f| {
        Rectangle::new(
            [
                (f.at.as_secs_f64(), 0.0),
                (f.until.as_secs_f64().min(end), height),
            ],
            RGBColor(214, 39, 40).mix(0.12).filled(),
        )
    })
}

/// The top panel: each group's share of new connections over time.
fn shares(area: &Area<'_>, sc: &Scenario, run: &SimRun, title: &str) -> Result<(), String> {
    let end = sc.duration.as_secs_f64();
    let mut chart = ChartBuilder::on(area)
        .caption(
            format!("{title}: traffic share per group"),
            ("sans-serif", 18),
        )
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(50)
        .build_cartesian_2d(0.0..end, 0.0..100.0)
        .map_err(err)?;
    chart
        .configure_mesh()
        .y_desc("% of new connections")
        .x_desc("seconds")
        .draw()
        .map_err(err)?;
    chart.draw_series(fault_windows(sc, 100.0)).map_err(err)?;
    for (i, g) in sc.groups.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        chart
            .draw_series(LineSeries::new(
                run.timeline.iter().map(|r| (r.t, r.weights_pct[i])),
                color.stroke_width(2),
            ))
            .map_err(err)?
            .label(g.name.clone())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE.mix(0.8))
        .draw()
        .map_err(err)
}

/// The bottom panel: client p99 per tick against the SLO.
fn latency(area: &Area<'_>, sc: &Scenario, run: &SimRun) -> Result<(), String> {
    let end = sc.duration.as_secs_f64();
    let slo_ms = sc.slo.as_secs_f64() * 1000.0;
    let max_p99 = run
        .timeline
        .iter()
        .map(|r| r.client_p99_ms)
        .fold(slo_ms * 1.5, f64::max);
    let top = max_p99 * 1.05;
    let mut chart = ChartBuilder::on(area)
        .caption(
            "client p99 per tick (faults shaded, dashed: SLO)",
            ("sans-serif", 16),
        )
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(50)
        .build_cartesian_2d(0.0..end, 0.0..top)
        .map_err(err)?;
    chart
        .configure_mesh()
        .y_desc("ms")
        .x_desc("seconds")
        .draw()
        .map_err(err)?;
    chart.draw_series(fault_windows(sc, top)).map_err(err)?;
    chart
        .draw_series(LineSeries::new(
            run.timeline.iter().map(|r| (r.t, r.client_p99_ms)),
            COLORS[0].stroke_width(2),
        ))
        .map_err(err)?;
    let slo = vec![(0.0, slo_ms), (end, slo_ms)];
    chart
        .draw_series(DashedLineSeries::new(slo, 6, 4, BLACK.stroke_width(1)))
        .map_err(err)?;
    Ok(())
}
