//! PNG line plots of QA quality against the KV-cache retention ratio.
//!
//! Text is rendered with the bundled DejaVu Sans (`trainer/assets/`, Bitstream
//! Vera licence, see `DejaVu-LICENSE.txt`) through plotters' `ab_glyph`
//! support, so no system font library is needed.

use super::error::{EvalError, Result};
use plotters::coord::ranged1d::SegmentedCoord;
use plotters::coord::types::RangedCoordi32;
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use std::path::Path;
use std::sync::OnceLock;

/// The retention ratios the x axis is labelled with.
pub const RATIO_TICKS: [f64; 6] = [0.02, 0.05, 0.1, 0.25, 0.5, 1.0];

/// Image size in pixels (width, height).
pub const PLOT_SIZE: (u32, u32) = (900, 600);

/// Font family name the bundled font is registered under.
const FONT: &str = "sans-serif";

static DEJAVU_SANS: &[u8] = include_bytes!("../../assets/DejaVuSans.ttf");

/// Line colours, one per series in order (repeated after the last).
const COLORS: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
];

/// One line of the plot: a method and its (retention ratio, F1 in percent) points.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    /// The legend entry (method name).
    pub name: String,
    /// `(r, f1)` points, with `r` in `(0, 1]` and F1 in percent; they are drawn
    /// in order of increasing `r`.
    pub points: Vec<(f64, f64)>,
}

/// Registers the bundled font with plotters once per process.
fn register_font() -> std::result::Result<(), String> {
    static DONE: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    DONE.get_or_init(|| {
        plotters::style::register_font(FONT, FontStyle::Normal, DEJAVU_SANS)
            .map_err(|_| "the bundled DejaVuSans.ttf is not a usable font".to_owned())
    })
    .clone()
}

/// Writes a PNG line plot of F1 (y, 0..100) against the retention ratio `r`
/// (x, log scale, ticks at [`RATIO_TICKS`]) with one line with markers per
/// series, a legend, `title` and axis labels. Errors name `path`: no series, a
/// series without points, a ratio that is not positive and finite or an F1 that
/// is not finite, or a failure to draw or write the file.
pub fn plot_f1_vs_ratio(path: &Path, title: &str, series: &[Series]) -> Result<()> {
    let err = |msg: String| EvalError::Plot {
        path: path.to_path_buf(),
        msg,
    };
    if series.is_empty() {
        return Err(err("no series to plot".into()));
    }
    let mut r_min = RATIO_TICKS[0];
    let mut r_max = RATIO_TICKS[RATIO_TICKS.len() - 1];
    for s in series {
        if s.points.is_empty() {
            return Err(err(format!("series {:?} has no points", s.name)));
        }
        for &(r, f) in &s.points {
            if !(r.is_finite() && r > 0.0) {
                return Err(err(format!(
                    "series {:?}: retention ratio {r} is not positive and finite",
                    s.name
                )));
            }
            if !f.is_finite() {
                return Err(err(format!("series {:?}: F1 {f} is not finite", s.name)));
            }
            r_min = r_min.min(r);
            r_max = r_max.max(r);
        }
    }
    register_font().map_err(err)?;
    let root = BitMapBackend::new(path, PLOT_SIZE).into_drawing_area();
    draw(&root, title, series, (r_min / 1.25, r_max * 1.1)).map_err(|e| err(e.to_string()))?;
    root.present().map_err(|e| err(e.to_string()))
}

type DrawResult<T> = std::result::Result<
    T,
    DrawingAreaErrorKind<<BitMapBackend<'static> as DrawingBackend>::ErrorType>,
>;

fn draw(
    root: &DrawingArea<BitMapBackend<'_>, Shift>,
    title: &str,
    series: &[Series],
    (x_lo, x_hi): (f64, f64),
) -> DrawResult<()> {
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(root)
        .caption(title, (FONT, 26))
        .margin(16)
        .x_label_area_size(50)
        .y_label_area_size(60)
        .build_cartesian_2d(
            (x_lo..x_hi)
                .log_scale()
                .with_key_points(RATIO_TICKS.to_vec()),
            0.0f64..100.0,
        )?;
    chart
        .configure_mesh()
        .x_desc("retention ratio r (log scale)")
        .y_desc("F1 (%)")
        .x_label_formatter(&|v| format_ratio(*v))
        .y_label_formatter(&|v| format!("{v:.0}"))
        .label_style((FONT, 16))
        .axis_desc_style((FONT, 18))
        .light_line_style(WHITE.mix(0.0))
        .bold_line_style(BLACK.mix(0.12))
        .draw()?;
    for (i, s) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let mut pts = s.points.clone();
        pts.sort_by(|a, b| a.0.total_cmp(&b.0));
        chart
            .draw_series(LineSeries::new(pts.iter().copied(), color.stroke_width(3)))?
            .label(s.name.as_str())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 24, y)], color.stroke_width(3))
            });
        chart.draw_series(pts.iter().map(|&p| Circle::new(p, 5, color.filled())))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .label_font((FONT, 16))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.4))
        .draw()?;
    Ok(())
}

/// Tick label of a ratio: `1.0`, `0.5`, `0.25`, `0.02`, ...
fn format_ratio(v: f64) -> String {
    if v == v.trunc() {
        format!("{v:.1}")
    } else {
        format!("{v}")
    }
}

/// One heat map: a title and values `[row][column]` in percent (`None`: no data).
#[derive(Debug, Clone, PartialEq)]
pub struct HeatPanel {
    /// Panel title (e.g. the method).
    pub title: String,
    /// Values per row (y) and column (x).
    pub cells: Vec<Vec<Option<f64>>>,
}

/// Writes a PNG of heat maps side by side (white 0 to dark green 100, each
/// cell labelled with its value), sharing the column labels `x_labels` (x axis
/// `x_desc`) and row labels `y_labels` (y axis `y_desc`).
pub fn plot_heatmaps(
    path: &Path,
    title: &str,
    panels: &[HeatPanel],
    (x_desc, x_labels): (&str, &[String]),
    (y_desc, y_labels): (&str, &[String]),
) -> Result<()> {
    let err = |msg: String| EvalError::Plot {
        path: path.to_path_buf(),
        msg,
    };
    if panels.is_empty() || x_labels.is_empty() || y_labels.is_empty() {
        return Err(err("no heat map panels or labels to draw".into()));
    }
    for p in panels {
        if p.cells.len() != y_labels.len() || p.cells.iter().any(|r| r.len() != x_labels.len()) {
            return Err(err(format!(
                "panel {:?} is not {} x {}",
                p.title,
                y_labels.len(),
                x_labels.len()
            )));
        }
    }
    register_font().map_err(err)?;
    let cols = panels.len().min(4);
    let rows = panels.len().div_ceil(cols);
    let size = (360 * cols as u32 + 40, 330 * rows as u32 + 60);
    let root = BitMapBackend::new(path, size).into_drawing_area();
    draw_heatmaps(
        &root,
        title,
        panels,
        (x_desc, x_labels),
        (y_desc, y_labels),
        (rows, cols),
    )
    .map_err(|e| err(e.to_string()))?;
    root.present().map_err(|e| err(e.to_string()))
}

/// A heat map axis of `n` cells: segments `Exact(0) ..= Exact(n - 1)`, then
/// `Last` as the far edge. (`(0..n).into_segmented()` would hold `n + 1`
/// segments, i32 ranges being inclusive as discrete coordinates, and draw an
/// empty extra row or column.)
fn cells_axis(n: i32) -> SegmentedCoord<RangedCoordi32> {
    (0..n - 1).into_segmented()
}

/// The far edge of cell `i` of [`cells_axis`]`(n)`.
fn cell_end(i: i32, n: i32) -> SegmentValue<i32> {
    if i + 1 >= n {
        SegmentValue::Last
    } else {
        SegmentValue::Exact(i + 1)
    }
}

fn draw_heatmaps(
    root: &DrawingArea<BitMapBackend<'_>, Shift>,
    title: &str,
    panels: &[HeatPanel],
    (x_desc, x_labels): (&str, &[String]),
    (y_desc, y_labels): (&str, &[String]),
    (rows, cols): (usize, usize),
) -> DrawResult<()> {
    root.fill(&WHITE)?;
    let root = root.titled(title, (FONT, 22))?;
    let areas = root.split_evenly((rows, cols));
    let (nx, ny) = (x_labels.len() as i32, y_labels.len() as i32);
    let label = |labels: &[String], v: &SegmentValue<i32>| match v {
        SegmentValue::CenterOf(i) => labels.get(*i as usize).cloned().unwrap_or_default(),
        _ => String::new(),
    };
    for (panel, area) in panels.iter().zip(areas) {
        let mut chart = ChartBuilder::on(&area)
            .caption(&panel.title, (FONT, 18))
            .margin(8)
            .x_label_area_size(40)
            .y_label_area_size(50)
            .build_cartesian_2d(cells_axis(nx), cells_axis(ny))?;
        chart
            .configure_mesh()
            .disable_mesh()
            .x_desc(x_desc)
            .y_desc(y_desc)
            .x_labels(nx as usize)
            .y_labels(ny as usize)
            .x_label_formatter(&|v| label(x_labels, v))
            .y_label_formatter(&|v| label(y_labels, v))
            .label_style((FONT, 13))
            .axis_desc_style((FONT, 14))
            .draw()?;
        for (y, row) in panel.cells.iter().enumerate() {
            for (x, cell) in row.iter().enumerate() {
                let (x, y) = (x as i32, y as i32);
                let color = match cell {
                    Some(v) => {
                        let t = (v / 100.0).clamp(0.0, 1.0);
                        RGBColor(
                            (255.0 * (1.0 - 0.85 * t)) as u8,
                            (255.0 * (1.0 - 0.45 * t)) as u8,
                            (255.0 * (1.0 - 0.75 * t)) as u8,
                        )
                    }
                    None => RGBColor(220, 220, 220),
                };
                chart.draw_series(std::iter::once(Rectangle::new(
                    [
                        (SegmentValue::Exact(x), SegmentValue::Exact(y)),
                        (cell_end(x, nx), cell_end(y, ny)),
                    ],
                    color.filled(),
                )))?;
                if let Some(v) = cell {
                    let style = TextStyle::from((FONT, 15).into_font())
                        .color(&BLACK)
                        .pos(Pos::new(HPos::Center, VPos::Center));
                    chart.draw_series(std::iter::once(Text::new(
                        format!("{v:.0}"),
                        (SegmentValue::CenterOf(x), SegmentValue::CenterOf(y)),
                        style,
                    )))?;
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each axis has one segment per cell and the last cell ends at the
    /// axis's far edge: no empty row or column (seen with 2 lengths).
    #[test]
    fn heat_map_axes_hold_exactly_the_cells() {
        for n in [1, 2, 3, 5] {
            let axis = cells_axis(n);
            let cells: Vec<_> = axis
                .values()
                .filter(|v| matches!(v, SegmentValue::Exact(_)))
                .collect();
            assert_eq!(cells.len(), n as usize, "{n} cells");
            assert!(matches!(cell_end(n - 1, n), SegmentValue::Last));
            let (far, last_start) = (
                axis.map(&SegmentValue::Last, (0, 1000)),
                axis.map(&SegmentValue::Exact(n - 1), (0, 1000)),
            );
            assert!(far > last_start, "{n}: the last cell has width");
            assert!(
                far >= 999,
                "{n}: the last cell reaches the far edge ({far})"
            );
        }
    }
}
