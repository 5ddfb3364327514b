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

/// Renders the chart as SVG text.
pub fn svg(sc: &Scenario, run: &SimRun, title: &str) -> Result<String, String> {
    let mut out = String::new();
    {
        let root = SVGBackend::with_string(&mut out, (1000, 640)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        let (top, bottom) = root.split_vertically(340);
        let end = sc.duration.as_secs_f64();

        let mut weights = ChartBuilder::on(&top)
            .caption(
                format!("{title}: traffic share per group"),
                ("sans-serif", 18),
            )
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(50)
            .build_cartesian_2d(0.0..end, 0.0..100.0)
            .map_err(|e| e.to_string())?;
        weights
            .configure_mesh()
            .y_desc("% of new connections")
            .x_desc("seconds")
            .draw()
            .map_err(|e| e.to_string())?;
        for f in &sc.faults {
            weights
                .draw_series(std::iter::once(Rectangle::new(
                    [
                        (f.at.as_secs_f64(), 0.0),
                        (f.until.as_secs_f64().min(end), 100.0),
                    ],
                    RGBColor(214, 39, 40).mix(0.12).filled(),
                )))
                .map_err(|e| e.to_string())?;
        }
        for (i, g) in sc.groups.iter().enumerate() {
            let color = COLORS[i % COLORS.len()];
            weights
                .draw_series(LineSeries::new(
                    run.timeline.iter().map(|r| (r.t, r.weights_pct[i])),
                    color.stroke_width(2),
                ))
                .map_err(|e| e.to_string())?
                .label(g.name.clone())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                });
        }
        weights
            .configure_series_labels()
            .border_style(BLACK)
            .background_style(WHITE.mix(0.8))
            .draw()
            .map_err(|e| e.to_string())?;

        let slo_ms = sc.slo.as_secs_f64() * 1000.0;
        let max_p99 = run
            .timeline
            .iter()
            .map(|r| r.client_p99_ms)
            .fold(slo_ms * 1.5, f64::max);
        let mut lat = ChartBuilder::on(&bottom)
            .caption(
                "client p99 per tick (faults shaded, dashed: SLO)",
                ("sans-serif", 16),
            )
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(50)
            .build_cartesian_2d(0.0..end, 0.0..max_p99 * 1.05)
            .map_err(|e| e.to_string())?;
        lat.configure_mesh()
            .y_desc("ms")
            .x_desc("seconds")
            .draw()
            .map_err(|e| e.to_string())?;
        for f in &sc.faults {
            lat.draw_series(std::iter::once(Rectangle::new(
                [
                    (f.at.as_secs_f64(), 0.0),
                    (f.until.as_secs_f64().min(end), max_p99 * 1.05),
                ],
                RGBColor(214, 39, 40).mix(0.12).filled(),
            )))
            .map_err(|e| e.to_string())?;
        }
        lat.draw_series(LineSeries::new(
            run.timeline.iter().map(|r| (r.t, r.client_p99_ms)),
            COLORS[0].stroke_width(2),
        ))
        .map_err(|e| e.to_string())?;
        lat.draw_series(DashedLineSeries::new(
            vec![(0.0, slo_ms), (end, slo_ms)],
            6,
            4,
            BLACK.stroke_width(1),
        ))
        .map_err(|e| e.to_string())?;
        root.present().map_err(|e| e.to_string())?;
    }
    Ok(out)
}
