//! Tests of `config`.

use super::*;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/config")
        .join(name)
}

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::from_yaml(text, Path::new("test.yaml"))
}

fn error(text: &str) -> String {
    match parse(text) {
        Ok(c) => panic!("accepted {text:?} as {c:?}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn empty_document_gives_defaults() {
    let c = Config::load(&fixture("minimal-empty.yaml")).unwrap();
    assert_eq!(c, Config::default());
    assert_eq!(c.monitoring.check_interval, Duration::from_secs(60));
    assert_eq!(c.monitoring.max_metrics_entries, 1000);
    assert_eq!(c.monitoring.export_format, ExportFormat::Records);
}

#[test]
fn seed_example_loads_with_its_values() {
    let c = Config::load(&fixture("seed-example.yaml")).unwrap();
    assert_eq!(c.logging.log_max_bytes, 5_242_880);
    assert_eq!(c.logging.log_backup_count, 7);
    assert_eq!(c.logging.log_level, LogLevel::Info);
    assert_eq!(c.monitoring.max_workers, 8);
    assert_eq!(c.monitoring.excluded_devices, vec!["loop", "dm-"]);
    assert!(c.ignored_keys().is_empty());
}

#[test]
fn upstream_newest_keys_load_and_report_the_ignored_one() {
    let c = Config::load(&fixture("upstream-newest-keys.yaml")).unwrap();
    assert_eq!(c.monitoring.retry_limit, 3);
    assert_eq!(c.monitoring.retry_delay, Duration::from_secs(2));
    assert_eq!(c.monitoring.max_metrics_entries, 1000);
    assert_eq!(c.ignored_keys(), vec!["monitoring.command_timeout"]);
}

#[test]
fn fractional_interval_down_to_a_tenth() {
    let c = parse("monitoring:\n  check_interval: 0.1\n").unwrap();
    assert_eq!(c.monitoring.check_interval, Duration::from_millis(100));
    let e = error("monitoring:\n  check_interval: 0.05\n");
    assert!(e.contains("check_interval") && e.contains("line 2"), "{e}");
}

#[test]
fn impossible_values_name_key_and_line() {
    for (doc, key, line) in [
        ("monitoring:\n  check_interval: 0\n", "check_interval", 2),
        (
            "logging:\n  log_level: INFO\nmonitoring:\n  max_workers: 0\n",
            "max_workers",
            4,
        ),
        ("logging:\n  log_level: LOUD\n", "log_level", 2),
        (
            "monitoring:\n  max_metrics_entries: 0\n",
            "max_metrics_entries",
            2,
        ),
        ("monitoring:\n  enable_swap: maybe\n", "enable_swap", 2),
        ("monitoring:\n  max_workers: -3\n", "max_workers", 2),
        (
            "monitoring:\n\n  exported_file: /tmp/x\n",
            "exported_file",
            3,
        ),
        ("monitor:\n  check_interval: 5\n", "monitor", 1),
        ("monitoring:\n  export_format: csv\n", "export_format", 2),
        ("monitoring:\n  retry_delay: -1\n", "retry_delay", 2),
        ("logging:\n  log_max_bytes: 0\n", "log_max_bytes", 2),
        ("monitoring:\n  export_interval: -5\n", "export_interval", 2),
        (
            "monitoring:\n  prometheus_listen: localhost\n",
            "prometheus_listen",
            2,
        ),
    ] {
        let e = error(doc);
        assert!(e.contains(key), "{doc:?}: {e}");
        assert!(e.contains(&format!("line {line}")), "{doc:?}: {e}");
        assert!(e.contains("test.yaml"), "{doc:?}: {e}");
    }
}

#[test]
fn level_names_are_case_insensitive() {
    let c = parse("logging:\n  log_level: warning\n").unwrap();
    assert_eq!(c.logging.log_level.as_tracing(), tracing::Level::WARN);
}

#[test]
fn formats_and_collectors_parse() {
    let c = parse("monitoring:\n  export_format: autoscale_ml\n  collector: files\n").unwrap();
    assert_eq!(c.monitoring.export_format, ExportFormat::AutoscaleMl);
    assert_eq!(c.monitoring.collector, CollectorChoice::Files);
}

#[test]
fn prometheus_listen_address() {
    let c = parse("monitoring:\n  prometheus_listen: \"[::1]:9273\"\n").unwrap();
    assert_eq!(
        c.monitoring.prometheus_listen,
        Some("[::1]:9273".parse().unwrap())
    );
    assert_eq!(Config::default().monitoring.prometheus_listen, None);
}

#[test]
fn deep_nesting_is_refused_fast_with_the_limit_and_the_line() {
    let flow = format!(
        "monitoring:\n  excluded_devices: {}{}\n",
        "[".repeat(50_000),
        "]".repeat(50_000)
    );
    let mut block = String::from("# generated\nmonitoring:\n  excluded_devices:\n");
    for _ in 0..2_000 {
        block.push_str(&"- ".repeat(50));
        block.push_str("x\n");
    }
    block.push_str(&format!("    {}x\n", "- ".repeat(70)));
    let mut indented = String::from("monitoring:\n");
    for i in 0..100 {
        indented.push_str(&format!("{}k{i}:\n", "  ".repeat(i + 1)));
    }
    for (doc, line) in [(flow, 2), (block, 2004), (indented, 65)] {
        let t = std::time::Instant::now();
        let e = error(&doc);
        assert!(
            t.elapsed() < Duration::from_millis(200),
            "{:?}",
            t.elapsed()
        );
        assert!(e.contains("limit of 64 levels"), "{e}");
        assert!(e.contains(&format!("at line {line}")), "{e}");
        assert!(e.starts_with("test.yaml: "), "{e}");
    }
}

#[test]
fn nesting_within_the_limit_and_look_alikes_pass_the_scan() {
    let ok = format!("a: {}x{}\n", "[".repeat(63), "]".repeat(63));
    assert_eq!(limits::too_deep(&ok, MAX_CONFIG_DEPTH), None);
    let quoted = format!(
        "a: \"{}\"\nb: it's [[\n# {}\nc: |\n  {}\n",
        "[".repeat(100),
        "{".repeat(100),
        "- ".repeat(100)
    );
    assert_eq!(
        limits::too_deep(&quoted, 4),
        None,
        "brackets in quotes, comments, block scalars"
    );
    for name in ["seed-example.yaml", "upstream-newest-keys.yaml"] {
        let text = std::fs::read_to_string(fixture(name)).unwrap();
        assert_eq!(limits::too_deep(&text, 4), None, "{name}");
    }
}

#[test]
fn oversized_file_is_refused_before_parsing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("big.yaml");
    let mut text = String::from("monitoring:\n  check_interval: 5\n");
    while text.len() as u64 <= MAX_CONFIG_BYTES {
        text.push_str("# padding padding padding padding padding padding padding\n");
    }
    std::fs::write(&path, &text).unwrap();
    let e = Config::load(&path).unwrap_err().to_string();
    assert!(
        e.contains("limit of 1048576 bytes") && e.contains("big.yaml"),
        "{e}"
    );
}

#[test]
fn read_errors_name_the_cause_once() {
    let dir = tempfile::tempdir().unwrap();
    let e = Config::load(dir.path()).unwrap_err();
    let shown = crate::logging::Chain(&e).to_string();
    assert_eq!(shown.matches("os error 21").count(), 1, "{shown}");
    assert!(shown.starts_with("cannot read "), "{shown}");
}

#[test]
fn usable_checks_the_export_directory_without_creating_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = Config::default();
    c.logging.log_file = dir.path().join("agent.log");
    c.monitoring.export_file = dir.path().join("m.json");
    c.check_usable(Path::new("c.yaml")).unwrap();
    assert!(c.warnings().is_empty());
    c.monitoring.export_file = dir.path().join("gone/m.json");
    let e = c.check_usable(Path::new("c.yaml")).unwrap_err().to_string();
    assert!(
        e.contains("monitoring.export_file") && e.contains("does not exist"),
        "{e}"
    );
    assert!(!dir.path().join("gone").exists());
    c.monitoring.export_file = dir.path().to_path_buf();
    let e = c.check_usable(Path::new("c.yaml")).unwrap_err().to_string();
    assert!(e.contains("is a directory"), "{e}");
    c.logging.log_file = dir.path().join("gone/agent.log");
    assert_eq!(c.warnings().len(), 1);
}

#[test]
fn export_interval_seconds_or_every_cycle() {
    let c = parse("monitoring:\n  export_interval: 300\n").unwrap();
    assert_eq!(c.monitoring.export_interval, Some(Duration::from_secs(300)));
    let c = parse("monitoring:\n  export_interval: 0\n").unwrap();
    assert_eq!(c.monitoring.export_interval, None);
    assert_eq!(Config::default().monitoring.export_interval, None);
}

#[test]
fn serial_processing_uses_one_worker() {
    let c = parse("monitoring:\n  parallel_processing: false\n  max_workers: 4\n").unwrap();
    assert_eq!(c.workers(), 1);
}
