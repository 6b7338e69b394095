//! Grouped bar charts as SVG (the demo's and `ftx eval`'s report charts), laid out so that no
//! two labels overlap: each group of bars is as wide as its label needs, and the legend sits in
//! its own column right of the plot instead of over the bars.

use plotters::prelude::*;

/// Font size of the x labels and the legend (px).
const LABEL_PX: f64 = 13.0;
/// A generous width of one sans-serif character, as a fraction of the font size (DejaVu Sans,
/// the usual fallback, averages about 0.55 over lowercase text; capitals and `m`/`w` are wider).
const CHAR_EM: f64 = 0.68;
const MARGIN: u32 = 16;
const Y_LABEL_AREA: u32 = 60;
const HEIGHT: u32 = 480;

/// The width `text` needs at `px` pixels per em, at most.
pub fn text_width(text: &str, px: f64) -> f64 {
    text.chars().count() as f64 * px * CHAR_EM
}

/// Grouped bars as an SVG string: for each metric (x), one bar per series, on a y axis from 0
/// to `y_max` labelled `y_desc`.
pub fn bar_chart_svg(title: &str, metrics: &[&str], series: &[(&str, Vec<f64>)], y_max: f64, y_desc: &str) -> Result<String, String> {
    let n = metrics.len().max(1);
    // Each group is as wide as its widest label, plus a gap.
    let slot = metrics.iter().map(|m| text_width(m, LABEL_PX)).fold(90.0f64, f64::max) + 24.0;
    let legend_w = series.iter().map(|(s, _)| text_width(s, LABEL_PX)).fold(0.0f64, f64::max) as u32 + 48;
    let plot_w = (slot * n as f64).ceil() as u32;
    let caption_w = text_width(title, 22.0) as u32;
    let width = (Y_LABEL_AREA + plot_w + 2 * MARGIN + legend_w).max(caption_w + 2 * MARGIN).max(640);
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (width, HEIGHT)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        let root = root.titled(title, ("sans-serif", 22)).map_err(|e| e.to_string())?;
        let (plot_area, legend_area) = root.split_horizontally(width - legend_w);
        let mut chart = ChartBuilder::on(&plot_area)
            .margin(MARGIN)
            .x_label_area_size(40)
            .y_label_area_size(Y_LABEL_AREA)
            .build_cartesian_2d(0f64..n as f64, 0f64..y_max)
            .map_err(|e| e.to_string())?;
        let labels: Vec<String> = metrics.iter().map(|m| m.to_string()).collect();
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(n * 2 + 1)
            .x_label_style(("sans-serif", LABEL_PX))
            .x_label_formatter(&|x| {
                let i = x.floor() as usize;
                if (x - i as f64 - 0.5).abs() < 0.01 && i < labels.len() { labels[i].clone() } else { String::new() }
            })
            .y_desc(y_desc)
            .draw()
            .map_err(|e| e.to_string())?;
        let colors = [RGBColor(160, 160, 160), BLUE, RED, GREEN, MAGENTA, CYAN, RGBColor(230, 140, 0), BLACK];
        let width = 0.8 / series.len().max(1) as f64;
        for (k, (_, values)) in series.iter().enumerate() {
            let c = colors[k % colors.len()];
            chart
                .draw_series(values.iter().enumerate().map(|(i, &v)| {
                    let x0 = i as f64 + 0.1 + k as f64 * width;
                    Rectangle::new([(x0, 0.0), (x0 + width * 0.95, v)], c.filled())
                }))
                .map_err(|e| e.to_string())?;
        }
        // The legend: one swatch and name per series, a line each, in its own column.
        for (k, (name, _)) in series.iter().enumerate() {
            let c = colors[k % colors.len()];
            let y = MARGIN as i32 + 8 + k as i32 * 22;
            legend_area.draw(&Rectangle::new([(8, y), (22, y + 12)], c.filled())).map_err(|e| e.to_string())?;
            let style = TextStyle::from(("sans-serif", LABEL_PX).into_font()).color(&BLACK);
            legend_area.draw(&Text::new(name.to_string(), (30, y), style)).map_err(|e| e.to_string())?;
        }
        root.present().map_err(|e| e.to_string())?;
    }
    Ok(svg)
}
