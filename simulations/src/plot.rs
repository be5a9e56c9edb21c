//! Plain SVG line charts: no dependencies, readable in any browser.

use std::fmt::Write as _;

/// One line on a chart.
#[derive(Debug, Clone)]
pub struct Series {
    /// Legend text.
    pub name: String,
    /// Points (x, y).
    pub points: Vec<(f64, f64)>,
}

const COLOURS: [&str; 8] = [
    "#1a73e8", "#1e8e3e", "#d93025", "#f9ab00", "#9334e6", "#12b5cb", "#e8710a", "#5f6368",
];
const WIDTH: f64 = 800.0;
const HEIGHT: f64 = 420.0;
/// Margins: left (y axis labels), right (legend), top (title), bottom (x axis labels).
const LEFT: f64 = 70.0;
const RIGHT: f64 = 240.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 50.0;

/// A "nice" step for about five ticks up to `max`.
fn step(max: f64) -> f64 {
    let raw = (max / 5.0).max(f64::MIN_POSITIVE);
    let magnitude = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 2.5, 5.0, 10.0]
        .into_iter()
        .map(|factor| factor * magnitude)
        .find(|candidate| *candidate >= raw)
        .unwrap_or(10.0 * magnitude)
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

fn label(value: f64) -> String {
    if value >= 1e6 {
        format!("{:.1}M", value / 1e6)
    } else if value >= 1e4 {
        format!("{:.0}k", value / 1e3)
    } else if value.fract() == 0.0 {
        format!("{value:.0}")
    } else {
        format!("{value:.1}")
    }
}

/// A line chart of `series` with axis titles.
pub fn line_chart(title: &str, x_title: &str, y_title: &str, series: &[Series]) -> String {
    let points = || series.iter().flat_map(|line| line.points.iter());
    let x_max = points().map(|p| p.0).fold(0.0, f64::max).max(1.0);
    let y_max = points().map(|p| p.1).fold(0.0, f64::max).max(1.0);
    let (x_step, y_step) = (step(x_max), step(y_max));
    let (x_top, y_top) = (
        (x_max / x_step).ceil() * x_step,
        (y_max / y_step).ceil() * y_step,
    );
    let plot_w = WIDTH - LEFT - RIGHT;
    let plot_h = HEIGHT - TOP - BOTTOM;
    let x = |value: f64| LEFT + value / x_top * plot_w;
    let y = |value: f64| TOP + plot_h - value / y_top * plot_h;
    let mut svg = String::new();
    let _ = write!(
        svg,
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="#fff"/>
<text x="{LEFT}" y="24" font-size="15" font-weight="bold">{}</text>
"##,
        escape(title)
    );
    let mut tick = 0.0;
    while tick <= y_top + y_step / 2.0 {
        let _ = writeln!(
            svg,
            r##"<line x1="{LEFT}" x2="{:.1}" y1="{:.1}" y2="{:.1}" stroke="#e0e0e0"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
            LEFT + plot_w,
            y(tick),
            y(tick),
            LEFT - 6.0,
            y(tick) + 4.0,
            label(tick)
        );
        tick += y_step;
    }
    let mut tick = 0.0;
    while tick <= x_top + x_step / 2.0 {
        let _ = writeln!(
            svg,
            r##"<line x1="{:.1}" x2="{:.1}" y1="{TOP}" y2="{:.1}" stroke="#f0f0f0"/><text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"##,
            x(tick),
            x(tick),
            TOP + plot_h,
            x(tick),
            TOP + plot_h + 16.0,
            label(tick)
        );
        tick += x_step;
    }
    let _ = writeln!(
        svg,
        r##"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text><text transform="translate(16,{:.1}) rotate(-90)" text-anchor="middle">{}</text>"##,
        LEFT + plot_w / 2.0,
        HEIGHT - 12.0,
        escape(x_title),
        TOP + plot_h / 2.0,
        escape(y_title)
    );
    for (index, line) in series.iter().enumerate() {
        let colour = COLOURS[index % COLOURS.len()];
        let path: Vec<String> = line
            .points
            .iter()
            .map(|(px, py)| format!("{:.1},{:.1}", x(*px), y(*py)))
            .collect();
        let _ = writeln!(
            svg,
            r##"<polyline fill="none" stroke="{colour}" stroke-width="2" points="{}"/>"##,
            path.join(" ")
        );
        let legend_y = TOP + 10.0 + index as f64 * 18.0;
        let _ = writeln!(
            svg,
            r##"<rect x="{:.1}" y="{:.1}" width="14" height="4" fill="{colour}"/><text x="{:.1}" y="{:.1}">{}</text>"##,
            WIDTH - RIGHT + 14.0,
            legend_y - 4.0,
            WIDTH - RIGHT + 34.0,
            legend_y + 1.0,
            escape(&line.name)
        );
    }
    svg.push_str("</svg>\n");
    svg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chart_has_every_series_and_escapes_text() {
        let svg = line_chart(
            "a < b",
            "minutes",
            "agents",
            &[
                Series {
                    name: "one".into(),
                    points: vec![(0.0, 0.0), (10.0, 200.0)],
                },
                Series {
                    name: "two & three".into(),
                    points: vec![(0.0, 5.0)],
                },
            ],
        );
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert!(svg.contains("a &lt; b") && svg.contains("two &amp; three"));
        assert_eq!(step(200.0), 50.0);
        assert_eq!(step(7.0), 2.0);
    }
}
