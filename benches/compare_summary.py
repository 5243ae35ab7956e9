#!/usr/bin/env python3
"""Medians and ratios for benches/compare.sh: reads <dir>/<server>-<scenario>-<repeat>.json
(one bts-guru-bench JSON line each) and prints a Markdown table of every target of issue 5,
bts-guru against Sockudo (and Soketi), medians of the repeats."""

import json
import statistics
import sys
from pathlib import Path


def load(out):
    runs = {}
    for f in sorted(Path(out).glob("*.json")):
        server, scen, rep = f.stem.rsplit("-", 2)
        text = f.read_text().strip().splitlines()
        if not text:
            continue
        try:
            runs.setdefault((server, scen), []).append(json.loads(text[-1]))
        except json.JSONDecodeError:
            pass
    return runs


def dig(d, *path):
    for p in path:
        if not isinstance(d, dict) or d.get(p) is None:
            return None
        d = d[p]
    return d


# (label, scenario, extractor, lower is better, target ratio vs Sockudo)
METRICS = [
    ("server CPU per 1,000 deliveries, 5,000 subs x 10 ev/s (ms)", "fanout5k",
     lambda r: dig(r, "server", "cpu_ms_per_1000_deliveries"), True, 0.5),
    ("server CPU per 1,000 deliveries at saturation, 1,000 subs, 200 ev/s offered (ms)", "sat1k",
     lambda r: dig(r, "server", "cpu_ms_per_1000_deliveries"), True, 0.25),
    ("p50 publish->receive, 5,000 subs x 10 ev/s (ms)", "fanout5k",
     lambda r: ms(dig(r, "latency_us", "p50")), True, None),
    ("p99 publish->receive, 5,000 subs x 10 ev/s (ms)", "fanout5k",
     lambda r: ms(dig(r, "latency_us", "p99")), True, 0.5),
    ("max deliveries/s, 1,000 subs, no loss, p99 <= 50 ms", "max1k",
     lambda r: dig(r, "max_deliveries_per_s"), False, 2.0),
    ("wire bytes per delivery, 5,000 subs x 10 ev/s (bytes)", "fanout5k",
     lambda r: dig(r, "wire", "bytes_per_delivery"), True, None),
    ("wire bytes per delivery, permessage-deflate offered (bytes)", "fanout5kz",
     lambda r: dig(r, "wire", "bytes_per_delivery"), True, None),
    ("server CPU per 1,000 deliveries, permessage-deflate offered (ms)", "fanout5kz",
     lambda r: dig(r, "server", "cpu_ms_per_1000_deliveries"), True, None),
    ("RSS per idle connection at 10,000, permessage-deflate offered (bytes)", "idle10kz",
     lambda r: dig(r, "server", "rss_bytes_per_connection"), True, ("abs", 2048)),
    ("RSS per idle connection at 10,000 (bytes)", "idle10k",
     lambda r: dig(r, "server", "rss_bytes_per_connection"), True, ("abs", 2048)),
    ("connections established per s (connect -> subscribed), 10,000", "idle10k",
     lambda r: dig(r, "connect", "per_s"), False, 2.0),
]


def ms(us):
    if us is None:
        return None
    if isinstance(us, str):
        return None
    return us / 1000.0


def integrity(runs, server):
    bad = []
    for (srv, scen), rs in runs.items():
        if srv != server:
            continue
        for r in rs:
            if not r.get("ok", False):
                bad.append(f"{scen}: run failed ({'; '.join(r.get('problems') or ['?'])})")
            d = r.get("deliveries") or {}
            for k in ("missing", "duplicates", "reordered"):
                if d.get(k):
                    bad.append(f"{scen}: {d[k]} {k}")
            if scen == "max1k":
                for step in r.get("steps") or []:
                    if step.get("pass") and any(step.get(k) for k in ("duplicates", "reordered")):
                        bad.append(f"{scen}: duplicates/reorders in a passing step")
    return bad


def fmt(v):
    if v is None:
        return "–"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    return f"{v:.2f}"


def main():
    out = sys.argv[1]
    runs = load(out)
    servers = [s for s in ("bts-guru", "sockudo", "soketi") if any(k[0] == s for k in runs)]
    print(f"Results in `{out}` (median of the repeats; each value's repeats in brackets).\n")
    head = "| metric | " + " | ".join(servers) + " | bts-guru / Sockudo | target |"
    print(head)
    print("|" + "---|" * (len(servers) + 3))
    for label, scen, get, lower, target in METRICS:
        meds = {}
        cells = []
        for s in servers:
            vals = [v for v in (get(r) for r in runs.get((s, scen), [])) if v is not None]
            med = statistics.median(vals) if vals else None
            meds[s] = med
            cells.append(fmt(med) + (" [" + ", ".join(fmt(v) for v in vals) + "]" if len(vals) > 1 else ""))
        ratio = None
        if meds.get("bts-guru") is not None and meds.get("sockudo"):
            ratio = meds["bts-guru"] / meds["sockudo"]
        if isinstance(target, tuple):
            v = meds.get("bts-guru")
            verdict = "not measured" if v is None else (
                ("met" if v <= target[1] else "MISSED") + f" (≤ {target[1]:,} B)")
        elif target is None:
            verdict = "–"
        elif ratio is None:
            verdict = "not measured"
        else:
            ok = ratio <= target if lower else ratio >= target
            verdict = ("met" if ok else "MISSED") + (f" (≤ {target}x)" if lower else f" (≥ {target}x)")
        print(f"| {label} | " + " | ".join(cells) + f" | {fmt(ratio) if ratio is not None else '–'} | {verdict} |")
    print()
    for s in servers:
        bad = integrity(runs, s)
        print(f"- {s}: " + ("no loss, duplicates or reordering in any run" if not bad else "; ".join(bad)))


if __name__ == "__main__":
    main()
