//! A latency percentile-distribution plot as hand-written SVG, drawn like HdrHistogram's plots:
//! the x axis is the percentile on a log scale of 1/(1-p) (0%, 90%, 99%, 99.9%, ...), the y axis
//! the latency.

use hdrhistogram::Histogram;

const W: f64 = 960.0;
const H: f64 = 540.0;
const LEFT: f64 = 84.0;
const RIGHT: f64 = 48.0;
const TOP: f64 = 64.0;
const BOTTOM: f64 = 64.0;
const COLORS: [&str; 10] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
    "#bcbd22", "#17becf",
];

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A "nice" axis maximum and step (1, 2, 2.5, 5 × 10^n) covering `max`.
fn nice(max: f64) -> (f64, f64) {
    let max = if max > 0.0 { max } else { 1.0 };
    let raw = max / 5.0;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 2.5, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * mag);
    ((max / step).ceil() * step, step)
}

fn pct_label(decade: u32) -> String {
    match decade {
        0 => "0%".into(),
        1 => "90%".into(),
        d => format!("99.{}%", "9".repeat(d as usize - 2)).replace("99.%", "99%"),
    }
}

/// The plot of each `(label, histogram)` (values in nanoseconds), in milliseconds.
pub fn percentile_plot(
    title: &str,
    subtitle: &str,
    series: &[(String, &Histogram<u64>)],
) -> String {
    let series: Vec<&(String, &Histogram<u64>)> =
        series.iter().filter(|s| !s.1.is_empty()).collect();
    let max_count = series.iter().map(|s| s.1.len()).max().unwrap_or(1).max(1);
    // Show decades up to the resolution of the largest series (at least 99%, at most 99.9999%).
    let decades = ((max_count as f64).log10().ceil() as u32).clamp(2, 6);
    let xmax = decades as f64;
    let ymax_ns = series.iter().map(|s| s.1.max()).max().unwrap_or(1) as f64;
    let (ymax, ystep) = nice(ymax_ns / 1e6);
    let pw = W - LEFT - RIGHT;
    let ph = H - TOP - BOTTOM;
    let x = |v: f64| LEFT + v / xmax * pw;
    let y = |ms: f64| TOP + ph - (ms / ymax).min(1.05) * ph;

    let mut s = String::new();
    s.push_str(&format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{H}\" viewBox=\"0 0 {W} {H}\" \
         font-family=\"Helvetica, Arial, sans-serif\" font-size=\"12\">\n"
    ));
    s.push_str(&format!(
        "<rect width=\"{W}\" height=\"{H}\" fill=\"white\"/>\n"
    ));
    s.push_str(&format!(
        "<text x=\"{}\" y=\"26\" font-size=\"16\" font-weight=\"bold\" text-anchor=\"middle\">{}</text>\n",
        W / 2.0,
        esc(title)
    ));
    s.push_str(&format!(
        "<text x=\"{}\" y=\"44\" fill=\"#555\" text-anchor=\"middle\">{}</text>\n",
        W / 2.0,
        esc(subtitle)
    ));
    // Grid and axes.
    let mut v = 0.0;
    while v <= ymax + ystep / 2.0 {
        let yy = y(v);
        s.push_str(&format!(
            "<line x1=\"{LEFT}\" y1=\"{yy:.1}\" x2=\"{:.1}\" y2=\"{yy:.1}\" stroke=\"#e5e5e5\"/>\n\
             <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>\n",
            LEFT + pw,
            LEFT - 6.0,
            yy + 4.0,
            trim_num(v)
        ));
        v += ystep;
    }
    for d in 0..=decades {
        let xx = x(d as f64);
        s.push_str(&format!(
            "<line x1=\"{xx:.1}\" y1=\"{TOP}\" x2=\"{xx:.1}\" y2=\"{:.1}\" stroke=\"#e5e5e5\"/>\n\
             <text x=\"{xx:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>\n",
            TOP + ph,
            TOP + ph + 18.0,
            pct_label(d)
        ));
    }
    s.push_str(&format!(
        "<rect x=\"{LEFT}\" y=\"{TOP}\" width=\"{pw}\" height=\"{ph}\" fill=\"none\" stroke=\"#333\"/>\n"
    ));
    s.push_str(&format!(
        "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">Percentile</text>\n",
        LEFT + pw / 2.0,
        H - 18.0
    ));
    s.push_str(&format!(
        "<text x=\"20\" y=\"{:.1}\" text-anchor=\"middle\" transform=\"rotate(-90 20 {:.1})\">Latency (ms)</text>\n",
        TOP + ph / 2.0,
        TOP + ph / 2.0
    ));
    // Legend box in the lower right (high percentiles at low latency are usually empty).
    let legend: Vec<String> = series
        .iter()
        .map(|(label, h)| {
            format!(
                "{label}: p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms (n={})",
                h.value_at_quantile(0.5) as f64 / 1e6,
                h.value_at_quantile(0.99) as f64 / 1e6,
                h.max() as f64 / 1e6,
                h.len()
            )
        })
        .collect();
    let lw = legend.iter().map(|l| l.chars().count()).max().unwrap_or(0) as f64 * 6.6 + 56.0;
    let lh = legend.len() as f64 * 18.0 + 10.0;
    let (lx, ly0) = (LEFT + pw - lw - 10.0, TOP + ph - lh - 10.0);
    // Curves.
    for (i, (_, h)) in series.iter().map(|s| (&s.0, s.1)).enumerate() {
        let color = COLORS[i % COLORS.len()];
        let mut pts = String::new();
        let steps = (xmax * 50.0) as u32;
        for k in 0..=steps {
            let xv = k as f64 / 50.0;
            let q = 1.0 - 10f64.powf(-xv);
            let val = if k == steps {
                h.max()
            } else {
                h.value_at_quantile(q)
            };
            pts.push_str(&format!("{:.1},{:.1} ", x(xv), y(val as f64 / 1e6)));
        }
        s.push_str(&format!(
            "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"2\" points=\"{}\"/>\n",
            pts.trim_end()
        ));
    }
    if !legend.is_empty() {
        s.push_str(&format!(
            "<rect x=\"{lx:.1}\" y=\"{ly0:.1}\" width=\"{lw:.1}\" height=\"{lh:.1}\" fill=\"white\" \
             fill-opacity=\"0.85\" stroke=\"#999\"/>\n"
        ));
    }
    for (i, text) in legend.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let ly = ly0 + 17.0 + i as f64 * 18.0;
        s.push_str(&format!(
            "<line x1=\"{:.1}\" y1=\"{ly:.1}\" x2=\"{:.1}\" y2=\"{ly:.1}\" stroke=\"{color}\" stroke-width=\"3\"/>\n\
             <text x=\"{:.1}\" y=\"{:.1}\">{}</text>\n",
            lx + 10.0,
            lx + 34.0,
            lx + 40.0,
            ly + 4.0,
            esc(text)
        ));
    }
    if series.is_empty() {
        s.push_str(&format!(
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\" fill=\"#999\">no samples</text>\n",
            LEFT + pw / 2.0,
            TOP + ph / 2.0
        ));
    }
    s.push_str("</svg>\n");
    s
}

fn trim_num(v: f64) -> String {
    let t = format!("{v:.3}");
    t.trim_end_matches('0').trim_end_matches('.').to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_and_nice_axes() {
        assert_eq!(pct_label(0), "0%");
        assert_eq!(pct_label(1), "90%");
        assert_eq!(pct_label(2), "99%");
        assert_eq!(pct_label(3), "99.9%");
        assert_eq!(pct_label(5), "99.999%");
        assert_eq!(nice(0.87), (1.0, 0.2));
        assert_eq!(nice(43.0), (50.0, 10.0));
    }

    #[test]
    fn plot_is_svg() {
        let mut h = crate::stats::new_hist();
        for i in 1..10_000u64 {
            h.record(i * 1000).unwrap();
        }
        let svg = percentile_plot("t<1>", "sub", &[("a&b".into(), &h)]);
        assert!(svg.starts_with("<svg"));
        assert!(svg.contains("t&lt;1&gt;"));
        assert!(svg.contains("a&amp;b"));
        assert!(svg.contains("99.99%"));
        assert!(svg.trim_end().ends_with("</svg>"));
    }
}
