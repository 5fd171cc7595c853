#!/usr/bin/python3
"""Check an lxcmon `autoscale_ml` export the way the lxc_autoscale_ml autoscaler reads it.

The autoscaler's data loader (pandas) walks the JSON array cycle by cycle, skips the key
"summary", treats every other key as a container id whose value must be an object, picks the
metric keys out of it, builds a DataFrame and runs pd.to_datetime over the timestamps, then
groups by container and diffs the timestamps. This script does the same and is stricter where
the contract (shared/spec/export-formats.md, section 2) is: every key present and numeric, no
null anywhere, naive timestamps with exactly six fractional digits, one timestamp per cycle.

Usage: autoscale_ml_check.py EXPORT.json     exit 0: fine; exit 1: violations listed on stderr.
Run it with the Python that has pandas (Debian: /usr/bin/python3 with python3-pandas).
"""

import json
import math
import re
import sys

import pandas as pd

TS_RE = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}$")
FLOAT_KEYS = [
    "cpu_usage_percent",
    "memory_usage_mb",
    "swap_usage_mb",
    "swap_total_mb",
    "filesystem_usage_gb",
    "filesystem_total_gb",
    "filesystem_free_gb",
]
NESTED_INT_KEYS = {"io_stats": ["reads", "writes"], "network_usage": ["rx_bytes", "tx_bytes"]}
SUMMARY_TS_KEYS = ["collection_start_time", "collection_end_time"]
SUMMARY_NUM_KEYS = [
    "total_containers",
    "collected_containers",
    "total_duration_seconds",
    "monitor_cpu_percent",
    "monitor_memory_usage_mb",
]


def is_number(v):
    # bool is an int subclass in Python; JSON true/false is not a number.
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def find_nulls(v, at, out):
    if v is None:
        out.append(f"null at {at}")
    elif isinstance(v, list):
        for i, x in enumerate(v):
            find_nulls(x, f"{at}[{i}]", out)
    elif isinstance(v, dict):
        for k, x in v.items():
            find_nulls(x, f"{at}.{k}", out)


def check(data):
    errors = []
    if not isinstance(data, list):
        return ["the export is not a JSON array"]
    if not data:
        return ["the export is an empty array"]
    find_nulls(data, "$", errors)

    rows = []
    for i, cycle in enumerate(data):
        at = f"$[{i}]"
        if not isinstance(cycle, dict):
            errors.append(f"{at} is not an object")
            continue
        summary = cycle.get("summary")
        if not isinstance(summary, dict):
            errors.append(f"{at}: no summary object")
        else:
            for k in SUMMARY_TS_KEYS:
                if not (isinstance(summary.get(k), str) and TS_RE.match(summary[k])):
                    errors.append(f"{at}.summary.{k} = {summary.get(k)!r}: not naive with 6 digits")
            for k in SUMMARY_NUM_KEYS:
                if not is_number(summary.get(k)):
                    errors.append(f"{at}.summary.{k} = {summary.get(k)!r}: not a number")
        stamps = set()
        containers = 0
        for cid, m in cycle.items():
            if cid == "summary":
                continue
            containers += 1
            cat = f"{at}[{cid!r}]"
            # The autoscaler indexes the value like a dict: anything else crashes it.
            if not isinstance(m, dict):
                errors.append(f"{cat} is not an object: {m!r}")
                continue
            ts = m.get("timestamp")
            if not (isinstance(ts, str) and TS_RE.match(ts)):
                errors.append(f"{cat}.timestamp = {ts!r}: not naive with 6 fractional digits")
            else:
                stamps.add(ts)
            for k in FLOAT_KEYS:
                if not is_number(m.get(k)):
                    errors.append(f"{cat}.{k} = {m.get(k)!r}: missing or not a number")
            if not is_int(m.get("process_count")):
                errors.append(f"{cat}.process_count = {m.get('process_count')!r}: not an integer")
            for outer, inner in NESTED_INT_KEYS.items():
                o = m.get(outer)
                if not isinstance(o, dict):
                    errors.append(f"{cat}.{outer} = {o!r}: not an object")
                    continue
                for k in inner:
                    if not is_int(o.get(k)) or o.get(k) < 0:
                        errors.append(f"{cat}.{outer}.{k} = {o.get(k)!r}: not a count")
            try:
                rows.append({
                    "container_id": cid,
                    "timestamp": m["timestamp"],
                    "cpu_usage_percent": m["cpu_usage_percent"],
                    "memory_usage_mb": m["memory_usage_mb"],
                    "process_count": m["process_count"],
                    "io_reads": m["io_stats"]["reads"],
                    "io_writes": m["io_stats"]["writes"],
                    "network_rx_bytes": m["network_usage"]["rx_bytes"],
                    "network_tx_bytes": m["network_usage"]["tx_bytes"],
                    "filesystem_usage_gb": m["filesystem_usage_gb"],
                })
            except (KeyError, TypeError) as e:
                errors.append(f"{cat}: the autoscaler's loader would skip it ({e!r})")
        if containers == 0:
            errors.append(f"{at}: a cycle without containers")
        if len(stamps) > 1:
            errors.append(f"{at}: {len(stamps)} different timestamps in one cycle: {sorted(stamps)}")
        if isinstance(summary, dict) and is_number(summary.get("collected_containers")):
            if summary["collected_containers"] != containers:
                errors.append(
                    f"{at}.summary.collected_containers = {summary['collected_containers']} "
                    f"but the cycle has {containers} containers"
                )

    if errors:
        return errors

    # What the autoscaler does next: a DataFrame, pd.to_datetime, per-container time diffs.
    df = pd.DataFrame(rows)
    try:
        df["timestamp"] = pd.to_datetime(df["timestamp"])
    except Exception as e:  # noqa: BLE001 - any failure here is what breaks the reader
        return [f"pd.to_datetime failed on the timestamps: {e}"]
    if df["timestamp"].dt.tz is not None:
        errors.append("timestamps carry a timezone; the autoscaler compares with naive now()")
    now = pd.Timestamp.now()
    try:
        age = (now - df["timestamp"]).dt.total_seconds()
    except Exception as e:  # noqa: BLE001
        return [f"comparing the timestamps with naive now() failed: {e}"]
    if (age < -300).any():
        errors.append("timestamps more than 5 minutes in the future of local now(): not local time?")
    diffs = df.groupby("container_id")["timestamp"].diff().dt.total_seconds().dropna()
    if (diffs <= 0).any():
        errors.append("a container's timestamps do not increase from cycle to cycle")
    for col in ["cpu_usage_percent", "memory_usage_mb", "io_reads", "io_writes"]:
        if not pd.api.types.is_numeric_dtype(df[col]):
            errors.append(f"column {col} is not numeric in the DataFrame ({df[col].dtype})")
    return errors


def main(argv):
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    try:
        with open(argv[1]) as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        print(f"autoscale_ml_check: cannot load {argv[1]}: {e}", file=sys.stderr)
        return 1
    errors = check(data)
    if errors:
        for e in errors[:50]:
            print(f"autoscale_ml_check: {e}", file=sys.stderr)
        print(f"autoscale_ml_check: {argv[1]}: {len(errors)} violation(s)", file=sys.stderr)
        return 1
    cycles = len(data)
    ids = sorted({k for c in data for k in c if k != "summary"})
    print(f"autoscale_ml_check: {argv[1]}: ok, {cycles} cycle(s), containers {ids}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
