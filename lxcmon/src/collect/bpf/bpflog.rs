//! The programs' own log lines (aya-log: rare kernel-side conditions, each logged at its 1st,
//! 2nd, 4th... occurrence per CPU), drained from their ring buffer once per cycle into the
//! agent's log. Draining reads the buffer's memory-mapped pages: no system call when it is
//! empty, which it nearly always is.

use aya::Ebpf;
use aya_log::EbpfLogger;
use lxcmon_common::MAP_BPF_LOG;

/// Hands aya-log's records (the `log` crate's) to `tracing`, under this module's target.
pub(crate) struct ToTracing;

impl log::Log for ToTracing {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        let msg = record.args();
        match record.level() {
            log::Level::Error => tracing::error!(kernel = true, "{msg}"),
            log::Level::Warn => tracing::warn!(kernel = true, "{msg}"),
            log::Level::Info => tracing::info!(kernel = true, "{msg}"),
            log::Level::Debug => tracing::debug!(kernel = true, "{msg}"),
            log::Level::Trace => tracing::trace!(kernel = true, "{msg}"),
        }
    }

    fn flush(&self) {}
}

/// The reader of the programs' log, or `None` (said once) when the object has none the
/// kernel accepted.
pub(crate) fn init(ebpf: &mut Ebpf) -> Option<EbpfLogger<ToTracing>> {
    match EbpfLogger::init_with_logger(ebpf, ToTracing) {
        Ok(l) => Some(l),
        Err(e) => {
            tracing::warn!(map = MAP_BPF_LOG, error = %e, "the BPF programs' log cannot be read: their rare conditions are only counted");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use log::Log;

    #[test]
    fn kernel_lines_reach_the_agents_log_at_their_level() {
        let out = crate::export::tests::captured_log(|| {
            for (level, text) in [
                (log::Level::Warn, "in-flight map refused a bio"),
                (log::Level::Error, "something worse"),
            ] {
                ToTracing.log(
                    &log::Record::builder()
                        .level(level)
                        .args(format_args!("{text}"))
                        .build(),
                );
            }
        });
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 2, "{out}");
        assert!(lines[0].contains("WARN") && lines[0].contains("in-flight map refused a bio"));
        assert!(lines[0].contains("kernel=true"), "{out}");
        assert!(lines[1].contains("ERROR") && lines[1].contains("something worse"));
    }
}
