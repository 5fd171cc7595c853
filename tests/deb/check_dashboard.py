#!/usr/bin/env python3
"""Validates dist/grafana/lxcmon-dashboard.json.

1. It is JSON with the expected shape: schemaVersion 36..41, a DS_PROMETHEUS input, the
   `instance` and `container` variables, panels that do not overlap.
2. Every PromQL expression (panel targets and variable queries) names only metrics that the
   agent serves (METRICS below, the /metrics contract), and every one of those is used.
3. With --served FILE: every metric the dashboard uses appears in FILE, a real scrape of the
   agent's /metrics.
4. With --promtool: every expression parses in Prometheus' own engine (`promtool check
   rules`), and the main per-container ones give the right numbers on synthetic series this
   script writes (`promtool test rules`): e.g. a CPU counter growing 0.5 s/s with 2 cores
   allowed must read 25 %.
Exit 0 when all holds; prints each failure otherwise.
"""
import json
import pathlib
import re
import subprocess
import sys
import tempfile

METRICS = {
    "lxcmon_container_cpu_seconds_total", "lxcmon_container_cpu_cores_allowed",
    "lxcmon_container_memory_bytes", "lxcmon_container_memory_limit_bytes",
    "lxcmon_container_swap_bytes", "lxcmon_container_swap_limit_bytes",
    "lxcmon_container_io_read_bytes_total", "lxcmon_container_io_written_bytes_total",
    "lxcmon_container_network_receive_bytes_total", "lxcmon_container_network_transmit_bytes_total",
    "lxcmon_container_filesystem_size_bytes", "lxcmon_container_filesystem_used_bytes",
    "lxcmon_container_filesystem_avail_bytes", "lxcmon_container_processes",
    "lxcmon_container_threads", "lxcmon_cycle_duration_seconds",
    "lxcmon_last_cycle_timestamp_seconds", "lxcmon_containers_running",
    "lxcmon_containers_exported", "lxcmon_collector_info", "lxcmon_errors_total",
    "lxcmon_export_write_failures_total",
    "lxcmon_container_pressure_cpu_waiting_seconds_total",
    "lxcmon_container_pressure_memory_waiting_seconds_total",
    "lxcmon_container_pressure_memory_stalled_seconds_total",
    "lxcmon_container_pressure_io_waiting_seconds_total",
    "lxcmon_container_cpu_cfs_periods_total", "lxcmon_container_cpu_cfs_throttled_periods_total",
    "lxcmon_container_cpu_cfs_throttled_seconds_total", "lxcmon_container_oom_kills_total",
    "lxcmon_container_mount_size_bytes", "lxcmon_container_mount_used_bytes",
    "lxcmon_container_mount_avail_bytes", "lxcmon_container_mount_files",
    "lxcmon_container_mount_files_free",
    "lxcmon_container_runqueue_wait_seconds_bucket", "lxcmon_container_runqueue_wait_seconds_sum",
    "lxcmon_container_runqueue_wait_seconds_count",
    "lxcmon_container_io_latency_seconds_bucket", "lxcmon_container_io_latency_seconds_sum",
    "lxcmon_container_io_latency_seconds_count",
    "lxcmon_container_tcp_retransmitted_segments_total",
}
# PromQL words that are not metric names.
KEYWORDS = {
    "sum", "min", "max", "avg", "count", "topk", "bottomk", "quantile", "stddev", "stdvar",
    "count_values", "group", "by", "without", "on", "ignoring", "group_left", "group_right",
    "and", "or", "unless", "offset", "bool", "rate", "irate", "increase", "delta", "idelta",
    "deriv", "abs", "clamp_min", "clamp_max", "label_values", "label_replace", "vector",
    "scalar", "time", "sort", "sort_desc", "max_over_time", "min_over_time", "avg_over_time",
    "last_over_time", "histogram_quantile", "round", "absent", "changes", "resets",
}
LABELS = {"instance", "container_name", "container_id", "collector", "kind", "job", "mountpoint",
          "fstype", "shared", "event", "device", "interface", "op", "le"}
VARS = {"$instance": ".*", "$container": ".*", "$rate_window": "2m"}

failures = []


def fail(msg):
    failures.append(msg)
    print("FAIL:", msg)


def metric_names(expr):
    """Identifiers of an expression that are neither PromQL words nor label names."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)        # string literals
    e = re.sub(r"\{[^}]*\}", "", e)                      # label matchers
    e = re.sub(r"\[[^\]]*\]", "", e)                     # range selectors
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", r"\1", e)
    names = set()
    for tok in re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", e):
        if tok in KEYWORDS or tok in LABELS:
            continue
        names.add(tok)
    return names


def all_panels(panels):
    for p in panels:
        yield p
        yield from all_panels(p.get("panels", []))


def substitute(expr):
    for k, v in VARS.items():
        expr = expr.replace(k, v)
    return expr


def main():
    root = pathlib.Path(__file__).resolve().parents[2]
    path = root / "dist/grafana/lxcmon-dashboard.json"
    d = json.loads(path.read_text())
    if not 36 <= d.get("schemaVersion", 0) <= 41:
        fail(f"schemaVersion {d.get('schemaVersion')}")
    if not any(i.get("name") == "DS_PROMETHEUS" and i.get("type") == "datasource"
               for i in d.get("__inputs", [])):
        fail("no DS_PROMETHEUS datasource input")
    variables = {v["name"]: v for v in d["templating"]["list"]}
    for name in ("instance", "container"):
        if name not in variables:
            fail(f"no template variable {name}")
    cq = variables.get("container", {}).get("query", {})
    cq = cq.get("query", "") if isinstance(cq, dict) else cq
    if not re.fullmatch(r"label_values\(lxcmon_container_memory_bytes(\{[^}]*\})?, container_name\)", cq):
        fail(f"container variable query: {cq}")

    exprs = []  # (where, expr)
    for v in d["templating"]["list"]:
        if v.get("type") == "query":
            q = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
            exprs.append((f"variable {v['name']}", q))
    boxes = []
    ids = set()
    for p in all_panels(d["panels"]):
        where = f"panel {p.get('id')} {p.get('title')!r}"
        if p.get("id") in ids:
            fail(f"{where}: duplicate id")
        ids.add(p.get("id"))
        g = p["gridPos"]
        boxes.append((where, g["x"], g["y"], g["w"], g["h"]))
        if g["x"] + g["w"] > 24:
            fail(f"{where}: wider than the grid")
        if p["type"] == "row":
            continue
        if p.get("datasource", {}).get("uid") != "${DS_PROMETHEUS}":
            fail(f"{where}: datasource is not ${{DS_PROMETHEUS}}")
        if not p.get("targets"):
            fail(f"{where}: no query")
        for t in p.get("targets", []):
            exprs.append((where, t["expr"]))
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            if a[1] < b[1] + b[3] and b[1] < a[1] + a[3] and a[2] < b[2] + b[4] and b[2] < a[2] + a[4]:
                fail(f"{a[0]} overlaps {b[0]}")

    used = set()
    for where, expr in exprs:
        names = metric_names(expr)
        unknown = names - METRICS
        if unknown:
            fail(f"{where}: unknown metric(s) {sorted(unknown)} in {expr}")
        if not names & METRICS:
            fail(f"{where}: names no lxcmon metric: {expr}")
        used |= names & METRICS
    if METRICS - used:
        fail(f"metrics the dashboard never shows: {sorted(METRICS - used)}")
    print(f"{len(exprs)} expressions in {len(boxes)} panels checked against {len(METRICS)} metric names")

    if "--served" in sys.argv:
        served_check(pathlib.Path(sys.argv[sys.argv.index("--served") + 1]))
    if "--promtool" in sys.argv:
        promtool_checks([substitute(e) for _, e in exprs if not e.startswith("label_values(")])
    return 1 if failures else 0


def served_check(scrape):
    """Every metric the dashboard uses is in a real scrape of the agent's /metrics."""
    served = set()
    for line in scrape.read_text().splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()[:4]
            served.add(name)
            if kind == "histogram":
                # Declared: its series are these (samples only where the kernel counts).
                served |= {name + "_bucket", name + "_sum", name + "_count"}
        elif line and not line.startswith("#"):
            served.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    if not served:
        fail(f"{scrape}: no metrics")
    unknown = {n for n in served if n.startswith("lxcmon_")} - METRICS - {"lxcmon_collector"}
    if unknown:
        print(f"note: served metrics the dashboard does not show: {sorted(unknown)}")
    missing = METRICS - served
    if missing:
        fail(f"metrics the dashboard uses but the agent does not serve: {sorted(missing)}")
    else:
        print(f"all {len(METRICS)} dashboard metrics are served by the agent "
              f"({len(served)} names in the scrape)")


# Synthetic series, 10 s apart: two containers on two nodes. Known rates and ratios.
SERIES = """
      - series: 'lxcmon_container_cpu_seconds_total{instance="pve1:9273",container_id="101",container_name="web"}'
        values: '0+5x100'
      - series: 'lxcmon_container_cpu_cores_allowed{instance="pve1:9273",container_id="101",container_name="web"}'
        values: '2x100'
      - series: 'lxcmon_container_cpu_seconds_total{instance="pve2:9273",container_id="200",container_name="db"}'
        values: '0+20x100'
      - series: 'lxcmon_container_cpu_cores_allowed{instance="pve2:9273",container_id="200",container_name="db"}'
        values: '4x100'
      - series: 'lxcmon_container_memory_bytes{instance="pve1:9273",container_id="101",container_name="web"}'
        values: '536870912x100'
      - series: 'lxcmon_container_memory_limit_bytes{instance="pve1:9273",container_id="101",container_name="web"}'
        values: '1073741824x100'
      - series: 'lxcmon_container_swap_bytes{instance="pve1:9273",container_id="101",container_name="web"}'
        values: '1048576x100'
      - series: 'lxcmon_container_swap_limit_bytes{instance="pve1:9273",container_id="101",container_name="web"}'
        values: '4194304x100'
      - series: 'lxcmon_container_swap_bytes{instance="pve2:9273",container_id="200",container_name="db"}'
        values: '0x100'
      - series: 'lxcmon_container_swap_limit_bytes{instance="pve2:9273",container_id="200",container_name="db"}'
        values: '0x100'
      - series: 'lxcmon_container_io_read_bytes_total{instance="pve1:9273",container_id="101",container_name="web"}'
        values: '0+10240x100'
      - series: 'lxcmon_container_io_written_bytes_total{instance="pve1:9273",container_id="101",container_name="web"}'
        values: '0+40960x100'
      - series: 'lxcmon_container_network_receive_bytes_total{instance="pve1:9273",container_id="101",container_name="web"}'
        values: '0+20480x100'
      - series: 'lxcmon_container_network_transmit_bytes_total{instance="pve1:9273",container_id="101",container_name="web"}'
        values: '0+5120x100'
      - series: 'lxcmon_container_filesystem_size_bytes{instance="pve1:9273",container_id="101",container_name="web"}'
        values: '8000000000x100'
      - series: 'lxcmon_container_filesystem_used_bytes{instance="pve1:9273",container_id="101",container_name="web"}'
        values: '2000000000x100'
      - series: 'lxcmon_container_pressure_cpu_waiting_seconds_total{instance="pve1:9273",container_id="101",container_name="web"}'
        values: '0+5x100'
      - series: 'lxcmon_container_cpu_cfs_periods_total{instance="pve1:9273",container_id="101",container_name="web"}'
        values: '0+100x100'
      - series: 'lxcmon_container_cpu_cfs_throttled_periods_total{instance="pve1:9273",container_id="101",container_name="web"}'
        values: '0+40x100'
      - series: 'lxcmon_container_oom_kills_total{instance="pve1:9273",container_id="101",container_name="web"}'
        values: '0+1x100'
      - series: 'lxcmon_container_mount_size_bytes{instance="pve1:9273",container_id="101",container_name="web",mountpoint="/mnt/data",fstype="ext4",shared="false"}'
        values: '1000x100'
      - series: 'lxcmon_container_mount_used_bytes{instance="pve1:9273",container_id="101",container_name="web",mountpoint="/mnt/data",fstype="ext4",shared="false"}'
        values: '750x100'
      - series: 'lxcmon_container_mount_files{instance="pve1:9273",container_id="101",container_name="web",mountpoint="/mnt/data",fstype="ext4",shared="false"}'
        values: '200x100'
      - series: 'lxcmon_container_mount_files_free{instance="pve1:9273",container_id="101",container_name="web",mountpoint="/mnt/data",fstype="ext4",shared="false"}'
        values: '150x100'
      - series: 'lxcmon_container_runqueue_wait_seconds_bucket{instance="pve1:9273",container_id="101",container_name="web",le="0.001"}'
        values: '0+90x100'
      - series: 'lxcmon_container_runqueue_wait_seconds_bucket{instance="pve1:9273",container_id="101",container_name="web",le="0.002"}'
        values: '0+100x100'
      - series: 'lxcmon_container_runqueue_wait_seconds_bucket{instance="pve1:9273",container_id="101",container_name="web",le="+Inf"}'
        values: '0+100x100'
      - series: 'lxcmon_container_runqueue_wait_seconds_sum{instance="pve1:9273",container_id="101",container_name="web"}'
        values: '0+0.15x100'
      - series: 'lxcmon_container_runqueue_wait_seconds_count{instance="pve1:9273",container_id="101",container_name="web"}'
        values: '0+100x100'
      - series: 'lxcmon_container_io_latency_seconds_bucket{instance="pve1:9273",container_id="101",container_name="web",op="read",le="0.0005"}'
        values: '0+50x100'
      - series: 'lxcmon_container_io_latency_seconds_bucket{instance="pve1:9273",container_id="101",container_name="web",op="read",le="0.001"}'
        values: '0+100x100'
      - series: 'lxcmon_container_io_latency_seconds_bucket{instance="pve1:9273",container_id="101",container_name="web",op="read",le="+Inf"}'
        values: '0+100x100'
      - series: 'lxcmon_container_io_latency_seconds_sum{instance="pve1:9273",container_id="101",container_name="web",op="read"}'
        values: '0+0.06x100'
      - series: 'lxcmon_container_io_latency_seconds_count{instance="pve1:9273",container_id="101",container_name="web",op="read"}'
        values: '0+100x100'
      - series: 'lxcmon_container_tcp_retransmitted_segments_total{instance="pve1:9273",container_id="101",container_name="web"}'
        values: '0+30x100'
"""
MOUNT = '{container_id="101",container_name="web",fstype="ext4",instance="pve1:9273",mountpoint="/mnt/data",shared="false"}'
WEB = '{container_id="101",container_name="web",instance="pve1:9273"}'
READ = '{container_id="101",container_name="web",instance="pve1:9273",op="read"}'
DB = '{container_id="200",container_name="db",instance="pve2:9273"}'


def find(exprs, *needles):
    for e in exprs:
        if all(n in e for n in needles):
            return e
    fail(f"no expression with {needles}")
    return None


def to_us(expr):
    return None if expr is None else f"round({expr}, 0.000001)"


def promtool_checks(exprs):
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        rules = ["groups:", "  - name: dashboard", "    rules:"]
        for i, e in enumerate(exprs):
            rules.append(f"      - record: dashboard_expr_{i}")
            rules.append(f"        expr: {json.dumps(e)}")
        (tmp / "rules.yml").write_text("\n".join(rules) + "\n")
        r = subprocess.run(["promtool", "check", "rules", str(tmp / "rules.yml")],
                           capture_output=True, text=True)
        if r.returncode != 0:
            fail(f"promtool check rules: {r.stdout}{r.stderr}")
        else:
            print(f"promtool: all {len(exprs)} expressions parse")

        # (expression, expected samples): ground truth from SERIES above.
        cases = [
            (find([e for e in exprs if not e.startswith("topk")],
                  "rate(lxcmon_container_cpu_seconds_total", "cpu_cores_allowed"),
             [(WEB, 25), (DB, 50)]),  # 0.5 s/s of 2 cores; 2 s/s of 4 cores
            (find(exprs, "lxcmon_container_memory_limit_bytes"), [(WEB, 50)]),
            (find(exprs, "lxcmon_container_swap_limit_bytes"), [(WEB, 25)]),  # db: limit 0, left out
            (find(exprs, "lxcmon_container_filesystem_used_bytes", "filesystem_size_bytes"), [(WEB, 25)]),
            (find([e for e in exprs if "+" not in e], "rate(lxcmon_container_io_read_bytes_total"), [(WEB, 1024)]),
            (find([e for e in exprs if "+" not in e], "rate(lxcmon_container_io_written_bytes_total"), [(WEB, 4096)]),
            (find([e for e in exprs if "+" not in e], "rate(lxcmon_container_network_receive_bytes_total"), [(WEB, 2048)]),
            (find([e for e in exprs if "+" not in e], "rate(lxcmon_container_network_transmit_bytes_total"), [(WEB, 512)]),
            (find(exprs, "topk(10, rate(lxcmon_container_io_read"), [(WEB, 5120)]),
            (find(exprs, "topk(10, rate(lxcmon_container_network_receive"), [(WEB, 2560)]),
            # 5 s of waiting per 10 s; 40 of 100 periods throttled; a kill every 10 s: 12 in the 2 min window.
            (find(exprs, "rate(lxcmon_container_pressure_cpu_waiting"), [(WEB, 0.5)]),
            (find(exprs, "cpu_cfs_throttled_periods_total", "cpu_cfs_periods_total"), [(WEB, 40)]),
            (find(exprs, "increase(lxcmon_container_oom_kills_total"), [(WEB, 12)]),
            (find(exprs, "lxcmon_container_mount_used_bytes", "mount_size_bytes"), [(MOUNT, 75)]),
            (find(exprs, "lxcmon_container_mount_files_free"), [(MOUNT, 25)]),
            # 90 of 100 waits per 10 s within 1 ms, the rest within 2 ms: the 99th is 1.9 ms,
            # interpolated in its bucket; 0.15 s over 100 waits: 1.5 ms each.
            # (Rounded to the µs: these divide, and promtool 2.42 compares floats exactly.)
            (to_us(find(exprs, "histogram_quantile(0.99", "runqueue_wait_seconds_bucket")), [(WEB, 0.0019)]),
            (to_us(find(exprs, "runqueue_wait_seconds_sum")), [(WEB, 0.0015)]),
            # Half of the reads within 0.5 ms, all within 1 ms: the 99th is 0.99 ms; 0.6 ms each.
            (to_us(find(exprs, "histogram_quantile(0.99", "io_latency_seconds_bucket")), [(READ, 0.00099)]),
            (to_us(find(exprs, "io_latency_seconds_sum")), [(READ, 0.0006)]),
            # 30 segments retransmitted every 10 s.
            (find(exprs, "rate(lxcmon_container_tcp_retransmitted_segments_total"), [(WEB, 3)]),
        ]
        lines = ["rule_files: []", "evaluation_interval: 10s", "tests:", "  - interval: 10s",
                 "    input_series:" + SERIES.rstrip("\n"), "    promql_expr_test:"]
        for expr, samples in cases:
            if expr is None:
                continue
            lines.append(f"      - expr: {json.dumps(expr)}")
            lines.append("        eval_time: 10m")
            lines.append("        exp_samples:")
            for labels, value in samples:
                lines.append(f"          - labels: {json.dumps(labels)}")
                lines.append(f"            value: {value}")
        (tmp / "test.yml").write_text("\n".join(lines) + "\n")
        r = subprocess.run(["promtool", "test", "rules", str(tmp / "test.yml")],
                           capture_output=True, text=True, cwd=tmp)
        if r.returncode != 0:
            fail(f"promtool test rules:\n{r.stdout}{r.stderr}")
        else:
            print(f"promtool: {len(cases)} expressions give the expected values on synthetic series")


if __name__ == "__main__":
    sys.exit(main())
