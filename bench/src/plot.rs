//! Latency-distribution plots (`--plot FILE.svg`): latency against
//! percentile on a "nines" scale (50%, 90%, 99%, 99.9%, …), one line per
//! series, as HdrHistogram plots do, so the tail is as visible as the
//! median.

use std::path::Path;

use anyhow::{Result, anyhow};
use hdrhistogram::Histogram;
use plotters::prelude::*;

/// Highest percentile plotted: 1 − 10^-NINES.
const NINES: f64 = 5.0;
/// Points per line.
const POINTS: u32 = 400;

/// Writes an SVG with one line per `(label, histogram of µs)`.
///
/// # Errors
/// If the file cannot be written.
pub fn percentiles(path: &Path, title: &str, series: &[(String, &Histogram<u64>)]) -> Result<()> {
    let top_ms = series
        .iter()
        .map(|(_, h)| h.max() as f64 / 1000.0)
        .fold(0.001_f64, f64::max)
        * 1.05;
    let root = SVGBackend::new(path, (900, 540)).into_drawing_area();
    let e = |e: DrawingAreaErrorKind<_>| anyhow!("plot {}: {e}", path.display());
    root.fill(&WHITE).map_err(e)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..NINES, 0.0..top_ms)
        .map_err(e)?;
    chart
        .configure_mesh()
        .x_labels(NINES as usize + 1)
        .x_label_formatter(&|x| nines_label(*x))
        .x_desc("percentile")
        .y_desc("latency (ms)")
        .draw()
        .map_err(e)?;
    for (i, (label, h)) in series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let points = (0..=POINTS).map(|k| {
            let x = NINES * f64::from(k) / f64::from(POINTS);
            let q = 1.0 - 10f64.powf(-x);
            (x, h.value_at_quantile(q) as f64 / 1000.0)
        });
        chart
            .draw_series(LineSeries::new(points, color.stroke_width(2)))
            .map_err(e)?
            .label(label.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
    }
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE.mix(0.8))
        .position(SeriesLabelPosition::UpperLeft)
        .draw()
        .map_err(e)?;
    root.present().map_err(e)?;
    Ok(())
}

/// 0 → "0%", 1 → "90%", 2 → "99%", 3 → "99.9%", …
fn nines_label(x: f64) -> String {
    let q = 100.0 * (1.0 - 10f64.powf(-x));
    let decimals = (x.round() as usize).saturating_sub(2);
    format!("{q:.decimals$}%")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nines_are_labelled_as_percentiles() {
        assert_eq!(nines_label(0.0), "0%");
        assert_eq!(nines_label(1.0), "90%");
        assert_eq!(nines_label(2.0), "99%");
        assert_eq!(nines_label(3.0), "99.9%");
        assert_eq!(nines_label(5.0), "99.999%");
    }
}
