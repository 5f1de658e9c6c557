"""``lossd monitors ...``: loss monitors from the command line."""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import re
import sys
import time
from typing import Callable

from lossd import wire
from lossd.cli import UsageError, client_flags, client_from as _client, parse_pairs as _pairs

_DURATION = re.compile(r"^(\d+)([smhd]?)$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str, flag: str) -> int:
    """``90``, ``90s``, ``5m``, ``1h``, ``7d`` -> seconds."""
    found = _DURATION.match(text.strip())
    if not found or int(found.group(1)) <= 0:
        raise UsageError(f"{flag} expects durations such as 90s, 5m, 1h or 7d. Expected a positive whole number "
                         f"with an optional unit. Received: {text!r}")
    return int(found.group(1)) * _UNITS[found.group(2)]


def _number(value: float, digits: int = 4) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}g}"


def _monitor_json(monitor) -> dict:
    return {"name": monitor.name, "display_name": monitor.display_name, "owner": monitor.owner, "loss": monitor.loss,
            "windows": list(monitor.windows), "segment_keys": list(monitor.segment_keys),
            "retention": monitor.retention, "max_loss": monitor.max_loss,
            "create_time": monitor.create_time.isoformat() if monitor.create_time else None,
            "reference_time": monitor.reference_time.isoformat() if monitor.reference_time else None,
            "reference_window": monitor.reference_window, "pending": monitor.pending, "expired": monitor.expired,
            "report": [{"window": w.window, "segment": w.segment, "count": w.count,
                        "mean_loss": _plain(w.mean_loss), "p50_loss": _plain(w.p50_loss),
                        "p90_loss": _plain(w.p90_loss), "p99_loss": _plain(w.p99_loss),
                        "labelled_fraction": _plain(w.labelled_fraction),
                        "median_label_delay": _plain(w.median_label_delay),
                        "drift": {k: _plain(v) for k, v in w.drift.items()} if w.drift else None}
                       for w in monitor.windows_report]}


def _plain(value):
    """NaN as JSON's null (JSON has no NaN)."""
    return None if isinstance(value, float) and math.isnan(value) else value


def report_table(monitor) -> str:
    """The monitor's report as a table: one line per window and segment."""
    header = ("WINDOW", "SEGMENT", "PAIRS", "MEAN", "P50", "P90", "P99", "LABELLED", "DELAY", "DRIFT_P")
    rows = [header]
    for w in monitor.windows_report:
        rows.append((wire.window_label(w.window), w.segment or "(all)", str(w.count), _number(w.mean_loss),
                     _number(w.p50_loss), _number(w.p90_loss), _number(w.p99_loss),
                     "-" if math.isnan(w.labelled_fraction) else f"{w.labelled_fraction:.1%}",
                     "-" if math.isnan(w.median_label_delay) else f"{w.median_label_delay:.1f}s",
                     _number(w.drift["p_value"], 3) if w.drift else "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    lines.append(f"pending: {monitor.pending['predictions']} predictions, {monitor.pending['labels']} labels; "
                 f"expired: {monitor.expired['predictions']} predictions, {monitor.expired['labels']} labels")
    return "\n".join(lines)


def cmd_monitors_create(args) -> int:
    kind = "expression" if args.loss.startswith("expr:") else "name"
    loss = {kind: args.loss.removeprefix("expr:"), "params": _pairs(args.loss_param, "--loss-param")}
    windows = [parse_duration(w, "--windows") for w in args.windows.split(",")]
    retention = parse_duration(args.retention, "--retention") if args.retention else None
    keys = [k for k in (args.segment_keys or "").split(",") if k]
    with _client(args) as client:
        monitor = client.create_monitor(args.name, loss, windows, segment_keys=keys, retention=retention,
                                        display_name=args.display_name, max_loss=args.max_loss)
    print(monitor.name)
    return 0


def cmd_monitors_list(args) -> int:
    with _client(args) as client:
        monitors = client.monitors()
    if args.json:
        print(json.dumps([_monitor_json(m) for m in monitors], indent=2))
        return 0
    for m in monitors:
        loss = m.loss.get("name") or m.loss.get("expression") or "composite"
        print(f"{m.name}  {loss}  windows={','.join(wire.window_label(w) for w in m.windows)}"
              + (f"  segments={','.join(m.segment_keys)}" if m.segment_keys else "")
              + (f"  owner={m.owner}" if m.owner else ""))
    return 0


def cmd_monitors_get(args) -> int:
    with _client(args) as client:
        monitor = client.monitor(args.monitor)
    print(json.dumps(_monitor_json(monitor), indent=2) if args.json else f"{monitor.name}\n{report_table(monitor)}")
    return 0


def cmd_monitors_delete(args) -> int:
    with _client(args) as client:
        client.delete_monitor(args.monitor)
    return 0


def cmd_monitors_capture(args) -> int:
    window = parse_duration(args.window, "--window") if args.window else None
    with _client(args) as client:
        monitor = client.capture_reference(args.monitor, window)
    print(f"{monitor.name}: reference captured from the {wire.window_label(monitor.reference_window)} window")
    return 0


def cmd_monitors_watch(args) -> int:
    """A live table: the report again every ``--interval`` seconds (redrawn
    in place on a terminal), until Ctrl-C or ``--count`` reports."""
    live = sys.stdout.isatty()
    shown = 0
    try:
        with _client(args) as client:
            while args.count is None or shown < args.count:
                if shown:
                    time.sleep(args.interval)
                monitor = client.monitor(args.monitor)
                stamp = time.strftime("%H:%M:%S")
                text = f"{monitor.name}  {stamp}\n{report_table(monitor)}"
                print(("\033[H\033[J" + text) if live else (("\n" if shown else "") + text), flush=True)
                shown += 1
    except KeyboardInterrupt:
        pass
    return 0


def cmd_monitors_plot(args) -> int:
    """A PNG of each window's mean loss over the longest window, from the
    server's stored pairs (``GetMonitor`` with ``history_points``)."""
    from lossd._cli_training import plot_history

    with _client(args) as client:
        monitor = client.monitor(args.monitor, history_points=args.points)
    if not monitor.history:
        raise UsageError(f"{monitor.name} has no history. Expected pairs within its longest window. "
                         "Received: none.")
    now = max(when for when, *_ in monitor.history)
    times = sorted({when for when, *_ in monitor.history})
    series = {f"{wire.window_label(w)} mean loss": [mean for when, window, _, mean in monitor.history if window == w]
              for w in monitor.windows}
    span = max(monitor.windows)
    unit, size = ("seconds", 1) if span < 180 else ("minutes", 60) if span < 3 * 3600 else ("hours", 3600)
    ago = [round((t - now).total_seconds() / size, 1) for t in times]
    out = pathlib.Path(args.output or f"{monitor.name.split('/')[-1]}-loss.png")
    plot_history(series, out, title=f"{monitor.name} (loss at each point over the window before it)",
                 x_label=f"{unit} from now", x_values=ago)
    print(out)
    return 0


def register(subparsers, client_parser: Callable[[str, str], argparse.ArgumentParser]) -> None:
    """Adds ``monitors`` (with its sub-commands) to the ``lossd`` parser."""
    common = client_flags()
    monitors = client_parser("monitors", "watch a deployed model's loss, live (create, get, watch, ...)")
    msub = monitors.add_subparsers(dest="monitors_command", required=True)

    p = msub.add_parser("create", parents=[common], help="create a loss monitor")
    p.add_argument("name", help="its id: lower-case letters, digits and -")
    p.add_argument("--loss", required=True, help="a loss name (mse, sparse_categorical_crossentropy, ...) or "
                                                 "expr:EXPRESSION")
    p.add_argument("--loss-param", action="append", metavar="KEY=VALUE", help="loss parameter (repeatable)")
    p.add_argument("--windows", default="5m,1h", help="comma-separated durations such as 5m,1h [5m,1h]")
    p.add_argument("--segment-keys", help="comma-separated keys observations may set, such as model_version")
    p.add_argument("--retention", help="how long a prediction waits for its label, such as 1d [1d]")
    p.add_argument("--max-loss", type=float, default=None,
                   help="the mean loss above which the LossdMonitorLossHigh alert fires [none]")
    p.add_argument("--display-name", default="")
    p.set_defaults(func=cmd_monitors_create)

    p = msub.add_parser("list", parents=[common], help="list monitors")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_monitors_list)

    p = msub.add_parser("get", parents=[common], help="show a monitor's report")
    p.add_argument("monitor", help="monitors/NAME or NAME")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_monitors_get)

    p = msub.add_parser("delete", parents=[common], help="delete a monitor with everything it holds")
    p.add_argument("monitor", help="monitors/NAME or NAME")
    p.set_defaults(func=cmd_monitors_delete)

    p = msub.add_parser("capture", parents=[common], help="freeze a window's losses as the drift reference")
    p.add_argument("monitor", help="monitors/NAME or NAME")
    p.add_argument("--window", help="one of the monitor's windows [the longest]")
    p.set_defaults(func=cmd_monitors_capture)

    p = msub.add_parser("watch", parents=[common], help="a live table of a monitor's report")
    p.add_argument("monitor", help="monitors/NAME or NAME")
    p.add_argument("--interval", type=float, default=2.0, help="seconds between reports [2]")
    p.add_argument("--count", type=int, default=None, help="stop after this many reports [never]")
    p.set_defaults(func=cmd_monitors_watch)

    p = msub.add_parser("plot", parents=[common], help="write a PNG of each window's loss over time")
    p.add_argument("monitor", help="monitors/NAME or NAME")
    p.add_argument("--points", type=int, default=120, help="points over the longest window [120]")
    p.add_argument("-o", "--output", help="the PNG [NAME-loss.png]")
    p.set_defaults(func=cmd_monitors_plot)
