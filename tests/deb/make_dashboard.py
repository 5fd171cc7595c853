#!/usr/bin/env python3
"""Writes dist/grafana/lxcmon-dashboard.json (run from anywhere; the JSON is committed).

Edit this file, not the JSON, and re-run it; tests/deb/check_dashboard.py validates the result.
"""
import json
import pathlib

DS = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
SEL = 'instance=~"$instance", container_name=~"$container"'
NODE = 'instance=~"$instance"'
W = "$rate_window"

_next_id = [0]


def pid():
    _next_id[0] += 1
    return _next_id[0]


def target(expr, legend="", ref="A", instant=False, fmt="time_series"):
    t = {"datasource": DS, "expr": expr, "legendFormat": legend, "refId": ref,
         "range": not instant, "instant": instant, "format": fmt}
    return t


def timeseries(title, targets, unit, x, y, w=12, h=8, desc="", max_=None, stack=False):
    defaults = {"unit": unit, "custom": {"lineWidth": 1, "fillOpacity": 10,
                                         "showPoints": "never",
                                         "stacking": {"mode": "normal" if stack else "none"}}}
    if max_ is not None:
        defaults["max"] = max_
        defaults["min"] = 0
    return {"id": pid(), "type": "timeseries", "title": title, "description": desc,
            "datasource": DS, "gridPos": {"x": x, "y": y, "w": w, "h": h},
            "fieldConfig": {"defaults": defaults, "overrides": []},
            "options": {"legend": {"displayMode": "table", "placement": "right",
                                   "calcs": ["lastNotNull", "max"]},
                        "tooltip": {"mode": "multi", "sort": "desc"}},
            "targets": targets}


def stat(title, targets, unit, x, y, w=4, h=4, desc="", text_mode="auto"):
    return {"id": pid(), "type": "stat", "title": title, "description": desc,
            "datasource": DS, "gridPos": {"x": x, "y": y, "w": w, "h": h},
            "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
            "options": {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                        "textMode": text_mode, "colorMode": "value", "graphMode": "area"},
            "targets": targets}


def table(title, expr, unit, x, y, w=12, h=9, desc="", columns=()):
    return {"id": pid(), "type": "table", "title": title, "description": desc,
            "datasource": DS, "gridPos": {"x": x, "y": y, "w": w, "h": h},
            "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
            "options": {"showHeader": True,
                        "sortBy": [{"displayName": "Value", "desc": True}]},
            "transformations": [
                {"id": "organize", "options": {
                    "excludeByName": {"Time": True, "__name__": True, "job": True},
                    "indexByName": {name: i for i, name in enumerate(
                        ("instance", "container_name", "container_id", *columns, "Value"))}}}],
            "targets": [target(expr, "", instant=True, fmt="table")]}


def heatmap(title, expr, x, y, w=12, h=8, desc=""):
    """Buckets of a histogram (rates per `le`) as Grafana draws them: no re-bucketing."""
    return {"id": pid(), "type": "heatmap", "title": title, "description": desc,
            "datasource": DS, "gridPos": {"x": x, "y": y, "w": w, "h": h},
            "fieldConfig": {"defaults": {}, "overrides": []},
            "options": {"calculate": False, "cellGap": 1,
                        "color": {"mode": "scheme", "scheme": "Oranges", "steps": 64,
                                  "exponent": 0.5, "fill": "dark-orange", "reverse": False},
                        "yAxis": {"unit": "s", "axisPlacement": "left"},
                        "rowsFrame": {"layout": "le"},
                        "tooltip": {"mode": "single", "yHistogram": True},
                        "legend": {"show": True}},
            "targets": [target(expr, "{{le}}", fmt="heatmap")]}


def row(title, y):
    return {"id": pid(), "type": "row", "title": title, "collapsed": False,
            "gridPos": {"x": 0, "y": y, "w": 24, "h": 1}, "panels": []}


CPU_PCT = (f"100 * rate(lxcmon_container_cpu_seconds_total{{{SEL}}}[{W}])"
           f" / lxcmon_container_cpu_cores_allowed{{{SEL}}}")
MEM_PCT = (f"100 * lxcmon_container_memory_bytes{{{SEL}}}"
           f" / lxcmon_container_memory_limit_bytes{{{SEL}}}")
FS_PCT = (f"100 * lxcmon_container_filesystem_used_bytes{{{SEL}}}"
          f" / lxcmon_container_filesystem_size_bytes{{{SEL}}}")
DISK = (f"rate(lxcmon_container_io_read_bytes_total{{{SEL}}}[{W}])"
        f" + rate(lxcmon_container_io_written_bytes_total{{{SEL}}}[{W}])")
NET = (f"rate(lxcmon_container_network_receive_bytes_total{{{SEL}}}[{W}])"
       f" + rate(lxcmon_container_network_transmit_bytes_total{{{SEL}}}[{W}])")
LEG = "{{container_name}} ({{container_id}}) @ {{instance}}"

panels = []
y = 0
panels.append(row("Agent health", y)); y += 1
panels += [
    stat("Containers running", [target(f"sum(lxcmon_containers_running{{{NODE}}})")], "none",
         0, y, desc="Running containers found in the cgroup tree, summed over the selected nodes."),
    stat("Containers exported", [target(f"sum(lxcmon_containers_exported{{{NODE}}})")], "none",
         4, y, desc="Containers in the last cycle's export (a new container appears from its second cycle on)."),
    stat("Collector", [target(f"lxcmon_collector_info{{{NODE}}} == 1", "{{instance}}: {{collector}}")],
         "none", 8, y, text_mode="name",
         desc="Where network and block I/O counters come from: ebpf (BPF programs) or files (cgroup and /proc files)."),
    stat("Slowest cycle", [target(f"max(lxcmon_cycle_duration_seconds{{{NODE}}})")], "s",
         12, y, desc="Duration of the last collection cycle, slowest node."),
    stat("Errors (last hour)", [target(f"sum(increase(lxcmon_errors_total{{{NODE}}}[1h]))")],
         "none", 16, y),
    stat("Export write failures (last hour)",
         [target(f"sum(increase(lxcmon_export_write_failures_total{{{NODE}}}[1h]))")],
         "none", 20, y, desc="Failed writes of the JSON export file (disk full, directory gone)."),
]
y += 4
panels += [
    timeseries("Cycle duration", [target(f"lxcmon_cycle_duration_seconds{{{NODE}}}", "{{instance}}")],
               "s", 0, y, w=6),
    timeseries("Seconds since the last cycle",
               [target(f"time() - lxcmon_last_cycle_timestamp_seconds{{{NODE}}}", "{{instance}}")],
               "s", 6, y, w=6,
               desc="Grows past check_interval when an agent stops completing cycles (also /healthz: 503)."),
    timeseries("Errors by kind", [target(f"rate(lxcmon_errors_total{{{NODE}}}[{W}])",
                                         "{{instance}} {{kind}}")], "ops", 12, y, w=6,
               desc="kind: container (a container left out of a cycle), cycle, bpf."),
    timeseries("Containers", [target(f"lxcmon_containers_running{{{NODE}}}", "{{instance}} running", "A"),
                              target(f"lxcmon_containers_exported{{{NODE}}}", "{{instance}} exported", "B")],
               "none", 18, y, w=6),
]
y += 8
panels.append(row("CPU and memory", y)); y += 1
panels += [
    timeseries("CPU % of allowed cores", [target(CPU_PCT, LEG)], "percent", 0, y,
               desc="CPU time used over the rate window divided by the cores the container may use "
                    "(quota, cpuset, host CPUs): 100 % means it uses all it is allowed. Pick a rate "
                    "window of at least twice the agent's check_interval."),
    timeseries("Allowed cores", [target(f"lxcmon_container_cpu_cores_allowed{{{SEL}}}", LEG)], "none",
               12, y),
]
y += 8
panels += [
    timeseries("Memory (without page cache)", [target(f"lxcmon_container_memory_bytes{{{SEL}}}", LEG)],
               "bytes", 0, y),
    timeseries("Memory % of limit", [target(MEM_PCT, LEG)], "percent", 12, y, max_=100,
               desc="Memory in use over the container's limit (host memory when it has none)."),
]
y += 8
panels += [
    timeseries("Swap", [target(f"lxcmon_container_swap_bytes{{{SEL}}}", LEG)], "bytes", 0, y),
    timeseries("Swap % of limit",
               [target(f"100 * lxcmon_container_swap_bytes{{{SEL}}} / (lxcmon_container_swap_limit_bytes{{{SEL}}} > 0)", LEG)],
               "percent", 12, y, max_=100, desc="Containers without swap (limit 0) are not shown."),
]
y += 8
panels.append(row("Disk and network", y)); y += 1
panels += [
    timeseries("Disk read B/s", [target(f"rate(lxcmon_container_io_read_bytes_total{{{SEL}}}[{W}])", LEG)],
               "Bps", 0, y),
    timeseries("Disk write B/s", [target(f"rate(lxcmon_container_io_written_bytes_total{{{SEL}}}[{W}])", LEG)],
               "Bps", 12, y),
]
y += 8
panels += [
    timeseries("Network receive B/s",
               [target(f"rate(lxcmon_container_network_receive_bytes_total{{{SEL}}}[{W}])", LEG)],
               "Bps", 0, y),
    timeseries("Network transmit B/s",
               [target(f"rate(lxcmon_container_network_transmit_bytes_total{{{SEL}}}[{W}])", LEG)],
               "Bps", 12, y),
]
y += 8
panels.append(row("Filesystem and processes", y)); y += 1
panels += [
    timeseries("Root filesystem used %", [target(FS_PCT, LEG)], "percent", 0, y, max_=100),
    timeseries("Root filesystem available",
               [target(f"lxcmon_container_filesystem_avail_bytes{{{SEL}}}", LEG)], "bytes", 12, y,
               desc="Space available to unprivileged users, as df shows it."),
]
y += 8
panels += [
    timeseries("Processes", [target(f"lxcmon_container_processes{{{SEL}}}", LEG)], "none", 0, y),
    timeseries("Threads", [target(f"lxcmon_container_threads{{{SEL}}}", LEG)], "none", 12, y),
]
y += 8
panels.append(row("Top 10", y)); y += 1
panels += [
    table("Top 10 CPU % of allowed cores", f"topk(10, {CPU_PCT})", "percent", 0, y),
    table("Top 10 memory", f"topk(10, lxcmon_container_memory_bytes{{{SEL}}})", "bytes", 12, y),
]
y += 9
panels += [
    table("Top 10 disk read+write B/s", f"topk(10, {DISK})", "Bps", 0, y),
    table("Top 10 network rx+tx B/s", f"topk(10, {NET})", "Bps", 12, y),
]
y += 9
panels += [
    table("Top 10 root filesystem used %", f"topk(10, {FS_PCT})", "percent", 0, y),
    table("Top 10 processes", f"topk(10, lxcmon_container_processes{{{SEL}}})", "none", 12, y),
]
y += 9
panels.append(row("Pressure, throttling and OOM kills", y)); y += 1
panels += [
    timeseries("CPU pressure (share of time waiting)",
               [target(f"rate(lxcmon_container_pressure_cpu_waiting_seconds_total{{{SEL}}}[{W}])", LEG)],
               "percentunit", 0, y,
               desc="Share of wall time in which at least one task of the container waited for a "
                    "CPU (PSI cpu some). High while CPU % looks moderate: the container is starved "
                    "by its quota, its cpuset or the host."),
    timeseries("Memory pressure",
               [target(f"rate(lxcmon_container_pressure_memory_waiting_seconds_total{{{SEL}}}[{W}])",
                       "some {{container_name}} @ {{instance}}"),
                target(f"rate(lxcmon_container_pressure_memory_stalled_seconds_total{{{SEL}}}[{W}])",
                       "full {{container_name}} @ {{instance}}", ref="B")],
               "percentunit", 12, y,
               desc="Share of wall time the container's tasks stalled on memory: some (at least "
                    "one) and full (all at once). Growing before any OOM kill: it needs more memory."),
]
y += 8
panels += [
    timeseries("CPU throttled periods %",
               [target(f"100 * rate(lxcmon_container_cpu_cfs_throttled_periods_total{{{SEL}}}[{W}])"
                       f" / rate(lxcmon_container_cpu_cfs_periods_total{{{SEL}}}[{W}])", LEG)],
               "percent", 0, y,
               desc="Share of CFS periods in which the container used up its CPU quota."),
    timeseries("Throttled time per second",
               [target(f"rate(lxcmon_container_cpu_cfs_throttled_seconds_total{{{SEL}}}[{W}])", LEG)],
               "s", 12, y,
               desc="Seconds per second the container's tasks were held back by its quota (summed "
                    "over its CPUs)."),
]
y += 8
panels += [
    timeseries("OOM kills",
               [target(f"increase(lxcmon_container_oom_kills_total{{{SEL}}}[{W}])", LEG)],
               "short", 0, y,
               desc="Processes of the container killed by the OOM killer within the rate window."),
    timeseries("I/O pressure",
               [target(f"rate(lxcmon_container_pressure_io_waiting_seconds_total{{{SEL}}}[{W}])", LEG)],
               "percentunit", 12, y,
               desc="Share of wall time in which at least one task of the container stalled on I/O "
                    "(PSI io some)."),
]
y += 8
MOUNT_LEG = "{{container_name}} {{mountpoint}} (shared={{shared}}) @ {{instance}}"
panels.append(row("Filesystems per mount", y)); y += 1
panels += [
    timeseries("Used % per mount",
               [target(f"100 * lxcmon_container_mount_used_bytes{{{SEL}}}"
                       f" / (lxcmon_container_mount_size_bytes{{{SEL}}} > 0)", MOUNT_LEG)],
               "percent", 0, y,
               desc="Every filesystem mounted in the container (root, mpN, bind mounts). "
                    "shared=true: not the container's own (a directory of a larger filesystem, or "
                    "mounted by other containers too): its figures are the whole filesystem's."),
    timeseries("Inodes used % per mount",
               [target(f"100 * (1 - lxcmon_container_mount_files_free{{{SEL}}}"
                       f" / (lxcmon_container_mount_files{{{SEL}}} > 0))", MOUNT_LEG)],
               "percent", 12, y,
               desc="Inodes in use of every filesystem mounted in the container."),
]
y += 8
panels.append(table("Mounts by space available",
                    f"bottomk(20, lxcmon_container_mount_avail_bytes{{{SEL}}})", "bytes", 0, y,
                    w=24, columns=("mountpoint", "fstype", "shared"),
                    desc="Space available to unprivileged users on every filesystem of the "
                         "container, least first."))
y += 9
BY = "instance, container_name, container_id"
RUNQ = "lxcmon_container_runqueue_wait_seconds"
IOLAT = "lxcmon_container_io_latency_seconds"
panels.append(row("Latency from the kernel (BPF collector)", y)); y += 1
panels += [
    timeseries("Run-queue wait p99",
               [target(f"histogram_quantile(0.99, sum by ({BY}, le) (rate({RUNQ}_bucket{{{SEL}}}[{W}])))",
                       LEG)],
               "s", 0, y,
               desc="99th percentile of the time the container's tasks waited for a CPU once "
                    "runnable. High while CPU % is moderate: the host, or the container's quota, "
                    "keeps it waiting."),
    heatmap("Run-queue wait distribution",
            f"sum by (le) (rate({RUNQ}_bucket{{{SEL}}}[{W}]))", 12, y,
            desc="How often the selected containers' tasks waited how long for a CPU (waits per "
                 "second in each bucket)."),
]
y += 8
panels += [
    timeseries("Block I/O latency p99",
               [target(f"histogram_quantile(0.99, sum by ({BY}, op, le) (rate({IOLAT}_bucket{{{SEL}}}[{W}])))",
                       "{{op}} {{container_name}} ({{container_id}}) @ {{instance}}")],
               "s", 0, y,
               desc="99th percentile of the time from issue to completion of the container's disk "
                    "requests, reads and writes apart."),
    heatmap("Block I/O latency distribution",
            f"sum by (le) (rate({IOLAT}_bucket{{{SEL}}}[{W}]))", 12, y,
            desc="How many of the selected containers' disk requests took how long (requests per "
                 "second in each bucket)."),
]
y += 8
panels += [
    timeseries("Mean run-queue wait",
               [target(f"rate({RUNQ}_sum{{{SEL}}}[{W}]) / rate({RUNQ}_count{{{SEL}}}[{W}])", LEG)],
               "s", 0, y,
               desc="Average wait for a CPU per time a task of the container was switched in."),
    timeseries("Mean block I/O latency",
               [target(f"rate({IOLAT}_sum{{{SEL}}}[{W}]) / rate({IOLAT}_count{{{SEL}}}[{W}])",
                       "{{op}} {{container_name}} ({{container_id}}) @ {{instance}}")],
               "s", 12, y,
               desc="Average time from issue to completion of the container's disk requests."),
]
y += 8
panels += [
    timeseries("TCP segments retransmitted per second",
               [target(f"rate(lxcmon_container_tcp_retransmitted_segments_total{{{SEL}}}[{W}])", LEG)],
               "short", 0, y, w=24,
               desc="Segments the container's sockets sent again (lost on the way, or "
                    "acknowledged too late): the kernel's RetransSegs, per container."),
]

dashboard = {
    "__inputs": [{"name": "DS_PROMETHEUS", "label": "Prometheus",
                  "description": "Prometheus scraping lxcmon on every node (:9273/metrics)",
                  "type": "datasource", "pluginId": "prometheus", "pluginName": "Prometheus"}],
    "__requires": [
        {"type": "grafana", "id": "grafana", "name": "Grafana", "version": "10.4.0"},
        {"type": "datasource", "id": "prometheus", "name": "Prometheus", "version": "1.0.0"},
        {"type": "panel", "id": "timeseries", "name": "Time series", "version": ""},
        {"type": "panel", "id": "stat", "name": "Stat", "version": ""},
        {"type": "panel", "id": "table", "name": "Table", "version": ""},
        {"type": "panel", "id": "heatmap", "name": "Heatmap", "version": ""},
    ],
    "annotations": {"list": [{"builtIn": 1, "datasource": {"type": "grafana", "uid": "-- Grafana --"},
                              "enable": True, "hide": True, "iconColor": "rgba(0, 211, 255, 1)",
                              "name": "Annotations & Alerts", "type": "dashboard"}]},
    "description": "Per-container metrics of LXC / Proxmox VE nodes from lxcmon",
    "editable": True,
    "graphTooltip": 1,
    "id": None,
    "uid": "lxcmon-containers",
    "title": "lxcmon: LXC containers",
    "tags": ["lxcmon", "lxc", "proxmox"],
    "timezone": "browser",
    "refresh": "1m",
    "time": {"from": "now-6h", "to": "now"},
    "schemaVersion": 39,
    "version": 1,
    "links": [],
    "templating": {"list": [
        {"name": "instance", "label": "Node", "type": "query", "datasource": DS,
         "definition": "label_values(lxcmon_containers_running, instance)",
         "query": {"query": "label_values(lxcmon_containers_running, instance)", "refId": "instance"},
         "refresh": 2, "multi": True, "includeAll": True, "allValue": ".*",
         "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
         "sort": 1, "hide": 0, "options": []},
        {"name": "container", "label": "Container", "type": "query", "datasource": DS,
         "definition": 'label_values(lxcmon_container_memory_bytes{instance=~"$instance"}, container_name)',
         "query": {"query": 'label_values(lxcmon_container_memory_bytes{instance=~"$instance"}, container_name)',
                   "refId": "container"},
         "refresh": 2, "multi": True, "includeAll": True, "allValue": ".*",
         "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
         "sort": 1, "hide": 0, "options": []},
        {"name": "rate_window", "label": "Rate window", "type": "custom",
         "description": "Window of rate(): at least twice the agent's check_interval (60 s by default)",
         "query": "2m,5m,10m,1m,30s",
         "current": {"selected": True, "text": "2m", "value": "2m"},
         "options": [{"selected": v == "2m", "text": v, "value": v}
                     for v in ["2m", "5m", "10m", "1m", "30s"]],
         "multi": False, "includeAll": False, "hide": 0},
    ]},
    "panels": panels,
}

out = pathlib.Path(__file__).resolve().parents[2] / "dist/grafana/lxcmon-dashboard.json"
out.write_text(json.dumps(dashboard, indent=2) + "\n")
print(f"wrote {out}: {len(panels)} panels")
