//! The two text formats' common writer: families, samples, label escaping.

use std::fmt::Write as _;

#[derive(Clone, Copy, PartialEq)]
pub enum Kind {
    Counter,
    Gauge,
}

/// Writes metric families in either text format.
pub struct Writer {
    pub out: String,
    pub openmetrics: bool,
}

impl Writer {
    /// Starts a family; `name` is the sample name (counters end in `_total`).
    pub fn family(&mut self, name: &str, kind: Kind, help: &str) {
        let (family, ty) = match kind {
            Kind::Counter if self.openmetrics => (name.trim_end_matches("_total"), "counter"),
            Kind::Counter => (name, "counter"),
            Kind::Gauge => (name, "gauge"),
        };
        let _ = writeln!(self.out, "# HELP {family} {help}");
        let _ = writeln!(self.out, "# TYPE {family} {ty}");
    }

    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let _ = write!(self.out, "{k}=\"");
                escape_label(&mut self.out, v);
                self.out.push('"');
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {}", number(value));
    }
}

fn number(v: f64) -> String {
    if v.is_finite() {
        format!("{v}")
    } else {
        "0".into()
    }
}

/// Label values escape backslash, double quote and newline, in both formats.
fn escape_label(out: &mut String, v: &str) {
    for ch in v.chars() {
        match ch {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}
