"""Fuzzes every lossd RPC against a real server (a bench script, not a test).

It starts ``lossd serve`` as a subprocess with its own data directory, free
ports and small limits (``fuzzing.SMALL_LIMITS``: 1 MiB messages, 100k
elements per tensor, 256 KiB uploads, 4 training steps a job, 2 queued jobs),
trains one tiny classifier and one tiny generator so that Predict, Generate,
WatchJob and DownloadArtifact reach real models, then sends ``--requests``
calls drawn from the proto schema by ``tests/fuzzing.py`` (random messages
and near-valid ones with one field mutated) from ``--clients`` threads, each
with a deadline.

While it runs it samples the server's RSS and thread count (/proc), checks
gRPC health every few seconds, and kills the server if its RSS passes
``--rss-ceiling``. At the end it prints the calls and status codes per RPC,
the server's peak RSS (VmHWM), and saves every INTERNAL/UNKNOWN answer as a
reproducer (``findings/*.json``, with the server's traceback beside it).

Exits 1 on any INTERNAL/UNKNOWN, a server that died or passed the RSS
ceiling, or health that stopped answering SERVING.

Usage: python -m bench.fuzz [--requests 100000] [--clients 3] [--deadline 10] [--seed 0] [--minutes 17]
                        [--rss-ceiling 2] [--out DIR]
       python -m bench.fuzz --replay findings/0001-Evaluate.json [--address HOST:PORT]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import grpc  # noqa: E402
from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402

from tests import fuzzing  # noqa: E402
from lossd.v1 import loss_service_pb2, loss_service_pb2_grpc  # noqa: E402
from lossd.v1 import training_service_pb2 as tpb  # noqa: E402
from lossd.v1 import training_service_pb2_grpc  # noqa: E402

GiB = 1 << 30
LISTENING = re.compile(r"listening on \S+:(\d+) \(gRPC\)")


def read_status(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM (kB) and Threads of a process, from /proc/<pid>/status."""
    values = {}
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM", "Threads"):
                values[key] = int(rest.split()[0])
    return values


def children_rss_kb(pid: int) -> int:
    """RSS of the server's child processes (training jobs), in kB."""
    children = []
    for task in pathlib.Path(f"/proc/{pid}/task").glob("*"):
        try:  # each thread lists the children it started (the scheduler thread starts jobs)
            children += [int(c) for c in (task / "children").read_text(encoding="ascii").split()]
        except OSError:
            pass
    total = 0
    for child in children:
        try:
            total += read_status(child).get("VmRSS", 0)
        except OSError:
            pass
    return total


@dataclasses.dataclass
class Watch:
    """What the monitor saw."""

    peak_rss_kb: int = 0
    peak_children_rss_kb: int = 0
    peak_threads: int = 0
    samples: int = 0
    health_checks: int = 0
    health_failures: list = dataclasses.field(default_factory=list)
    killed_for_rss: bool = False
    died: str = ""


def start_server(data_dir: pathlib.Path, log_path: pathlib.Path, limits: dict) -> tuple[subprocess.Popen, int]:
    """Starts ``lossd serve`` on free ports; returns the process and its gRPC port."""
    flags = []
    for name, value in limits.items():
        flags += [f"--{name.replace('_', '-')}", str(value)]
    command = [sys.executable, "-m", "lossd.cli", "serve", "--host", "127.0.0.1", "--port", "0",
               "--metrics-port", "0", "--data-dir", str(data_dir), "--drain-seconds", "0", "--grace-seconds", "1",
               *flags]
    log = open(log_path, "w", encoding="utf-8")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ))
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server exited with {process.returncode} at start; see {log_path}")
        match = LISTENING.search(log_path.read_text(encoding="utf-8", errors="replace"))
        if match:
            return process, int(match.group(1))
        time.sleep(0.2)
    process.kill()
    raise SystemExit(f"the server did not start within 180 s; see {log_path}")


def monitor(process: subprocess.Popen, address: str, watch: Watch, stop: threading.Event, ceiling_kb: int) -> None:
    """Samples RSS and threads twice a second and health every 2 s until ``stop``."""
    channel = grpc.insecure_channel(address)
    health = health_pb2_grpc.HealthStub(channel)
    next_health = 0.0
    while not stop.is_set():
        if process.poll() is not None:
            watch.died = f"exit code {process.returncode}"
            stop.set()
            break
        try:
            status = read_status(process.pid)
        except OSError:
            continue
        watch.samples += 1
        watch.peak_rss_kb = max(watch.peak_rss_kb, status.get("VmRSS", 0))
        watch.peak_threads = max(watch.peak_threads, status.get("Threads", 0))
        watch.peak_children_rss_kb = max(watch.peak_children_rss_kb, children_rss_kb(process.pid))
        if status.get("VmRSS", 0) > ceiling_kb:
            watch.killed_for_rss = True
            process.kill()
            stop.set()
            break
        if time.monotonic() >= next_health:
            next_health = time.monotonic() + 2.0
            watch.health_checks += 1
            try:
                answer = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
                if answer.status != health_pb2.HealthCheckResponse.SERVING:
                    watch.health_failures.append(f"{time.strftime('%H:%M:%S')} {answer.status}")
            except grpc.RpcError as error:
                watch.health_failures.append(f"{time.strftime('%H:%M:%S')} {error.code().name}")
        stop.wait(0.5)
    channel.close()


def train_seed_jobs(address: str, ctx: fuzzing.Context, timeout: float) -> list[str]:
    """Trains a tiny classifier and a tiny generator (4 steps each), so that
    near-valid Predict, Generate and DownloadArtifact calls reach real models."""
    channel = grpc.insecure_channel(address)
    jobs = training_service_pb2_grpc.TrainingServiceStub(channel)
    made = []
    for preset, params in (("mlp", {"hidden_units": [4]}), ("vae", {"filters": [2], "latent_dim": 2})):
        spec = tpb.JobSpec(dataset="digits", epochs=1, steps_per_epoch=4, batch_size=8)
        spec.model.preset = preset
        spec.model.params.CopyFrom(fuzzing.make_struct(params))
        made.append((preset, jobs.CreateJob(tpb.CreateJobRequest(spec=spec), timeout=60).name))
    deadline = time.monotonic() + timeout
    names = []
    for preset, name in made:
        while time.monotonic() < deadline:
            job = jobs.GetJob(tpb.GetJobRequest(name=name), timeout=30)
            if job.state in (tpb.Job.STATE_SUCCEEDED, tpb.Job.STATE_FAILED, tpb.Job.STATE_CANCELLED):
                break
            time.sleep(1)
        state = tpb.Job.State.Name(job.state)
        print(f"seed job {name} ({preset}): {state}", flush=True)
        if job.state == tpb.Job.STATE_SUCCEEDED:
            (ctx.classifier_jobs if preset == "mlp" else ctx.generator_jobs).append(name)
            names.append(name)
        ctx.add_job(name)
    channel.close()
    return names


def traceback_for(log_text: str, details: str) -> str:
    """The server log's lines for the request id an INTERNAL answer names."""
    match = re.search(r"request id (\S+?)\.", details)
    if not match:
        return ""
    rid = match.group(1)
    lines = log_text.splitlines()
    for i, line in enumerate(lines):
        if rid in line and "unexpected error" in line:
            end = i + 1
            while end < len(lines) and not re.match(r"^\d{4}-\d\d-\d\d", lines[end]):
                end += 1
            return "\n".join(lines[i:end])
    return ""


def save_findings(tally: fuzzing.Tally, out: pathlib.Path, log_path: pathlib.Path) -> list[pathlib.Path]:
    folder = out / "findings"
    folder.mkdir(parents=True, exist_ok=True)
    log_text = log_path.read_text(encoding="utf-8", errors="replace") if log_path.exists() else ""
    paths = []
    for i, finding in enumerate(tally.findings + tally.hangs, 1):
        path = folder / f"{i:04d}-{finding.call.method.name}-{finding.code}.json"
        record = {"code": finding.code, "details": finding.details, **finding.call.to_json(),
                  "server_traceback": traceback_for(log_text, finding.details)}
        path.write_text(json.dumps(record, indent=1, ensure_ascii=False), encoding="utf-8")
        paths.append(path)
    return paths


def stop_server(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def directory_bytes(path: pathlib.Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=100_000, help="calls to send (default 100000)")
    parser.add_argument("--clients", type=int, default=3, help="threads sending calls at once (default 3)")
    parser.add_argument("--deadline", type=float, default=10.0, help="seconds each call may take (default 10)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the drawing (default 0)")
    parser.add_argument("--rss-ceiling", type=float, default=2.0,
                        help="GiB of server RSS that fails the run (default 2)")
    parser.add_argument("--minutes", type=float, default=0.0, help="stop after this long (0: no limit)")
    parser.add_argument("--no-seed-jobs", action="store_true", help="skip training the two tiny models first")
    parser.add_argument("--out", type=pathlib.Path,
                        help="folder for the log, summary and findings (default: a temp dir)")
    parser.add_argument("--replay", type=pathlib.Path, help="send one saved reproducer to --address, print its code")
    parser.add_argument("--address", default="127.0.0.1:50051", help="server for --replay")
    args = parser.parse_args(argv)
    # SIGTERM ends the run like Ctrl-C: the server is stopped and the tally printed.
    signal.signal(signal.SIGTERM, _interrupt)

    if args.replay:
        print(fuzzing.replay(args.address, str(args.replay), args.deadline))
        return 0

    out = args.out or pathlib.Path(tempfile.mkdtemp(prefix="lossd-fuzz-"))
    out.mkdir(parents=True, exist_ok=True)
    data_dir = out / "data"
    log_path = out / "server.log"
    print(f"output in {out}", flush=True)
    process, port = start_server(data_dir, log_path, fuzzing.SMALL_LIMITS)
    address = f"127.0.0.1:{port}"
    stop = threading.Event()
    watch = Watch()
    watcher = threading.Thread(target=monitor, args=(process, address, watch, stop, int(args.rss_ceiling * GiB / 1024)),
                               daemon=True)
    watcher.start()
    ctx = fuzzing.Context()
    tally = fuzzing.Tally()
    try:
        with grpc.insecure_channel(address) as channel:
            losses = loss_service_pb2_grpc.LossServiceStub(channel).ListLosses(
                loss_service_pb2.ListLossesRequest(), timeout=30).losses
            ctx.loss_names[:] = sorted({name for d in losses for name in (d.name, *d.aliases)})
        if not args.no_seed_jobs:
            train_seed_jobs(address, ctx, timeout=300)
        if args.minutes:
            threading.Timer(args.minutes * 60, stop.set).start()

        def progress(t: fuzzing.Tally) -> None:
            rate = t.count / max(1e-9, time.monotonic() - fuzz_start)
            print(f"{t.count:>7} calls, {rate:5.0f}/s, INTERNAL/UNKNOWN {t.bad()}, server RSS peak "
                  f"{watch.peak_rss_kb / 1024:.0f} MiB, threads {watch.peak_threads}", flush=True)

        fuzz_start = time.monotonic()
        try:
            fuzzing.run(address, ctx, args.requests, clients=args.clients, timeout=args.deadline, seed_=args.seed,
                        stop=stop, tally=tally, progress=progress)
        except KeyboardInterrupt:
            print("interrupted: stopping the server", flush=True)
        fuzz_seconds = time.monotonic() - fuzz_start
    finally:
        stop.set()
        watcher.join()
        try:
            final = read_status(process.pid)
        except OSError:
            final = {}
        # Cancel whatever the fuzzing left queued or running, then stop.
        if process.poll() is None:
            with grpc.insecure_channel(address) as channel:
                jobs = training_service_pb2_grpc.TrainingServiceStub(channel)
                for name in list(ctx.jobs):
                    try:
                        jobs.CancelJob(tpb.CancelJobRequest(name=name), timeout=10)
                    except grpc.RpcError:
                        pass
        stop_server(process)

    saved = save_findings(tally, out, log_path)
    rows = fuzzing.summary_rows(tally)
    width = max(len(r[0]) for r in rows) if rows else 10
    print(f"\n{'RPC':<{width}}  {'calls':>7}  status codes")
    for method, count, codes in rows:
        print(f"{method:<{width}}  {count:>7}  {codes}")
    if tally.cleanup:
        print(f"(and CancelJob right after each job CreateJob made: {dict(tally.cleanup)})")
    summary = {
        "requests": tally.count, "seconds": round(fuzz_seconds, 1),
        "rate_per_second": round(tally.count / fuzz_seconds, 1),
        "clients": args.clients, "seed": args.seed, "internal_or_unknown": tally.bad(),
        "deadline_exceeded": sum(c["DEADLINE_EXCEEDED"] for c in tally.codes.values()),
        "peak_rss_mib": round(max(final.get("VmHWM", 0), watch.peak_rss_kb) / 1024, 1),
        "peak_sampled_rss_mib": round(watch.peak_rss_kb / 1024, 1),
        "peak_job_processes_rss_mib": round(watch.peak_children_rss_kb / 1024, 1),
        "peak_threads": watch.peak_threads, "rss_samples": watch.samples,
        "health_checks": watch.health_checks, "health_failures": watch.health_failures,
        "server_died": watch.died, "killed_for_rss": watch.killed_for_rss,
        "data_dir_mib": round(directory_bytes(data_dir) / 2**20, 1),
        "codes": {method: dict(counts) for method, counts in tally.codes.items()},
        "stream_answers": {method: dict(counts) for method, counts in tally.items.items()},
        "cleanup_cancels": dict(tally.cleanup),
        "findings": [str(p) for p in saved],
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
    print(f"\n{tally.count} calls in {fuzz_seconds:.0f} s ({summary['rate_per_second']}/s), {args.clients} clients; "
          f"INTERNAL/UNKNOWN: {tally.bad()}; DEADLINE_EXCEEDED: {summary['deadline_exceeded']}")
    print(f"server peak RSS (VmHWM) {summary['peak_rss_mib']} MiB; peak threads {watch.peak_threads}; "
          f"job processes peak RSS {summary['peak_job_processes_rss_mib']} MiB; data dir {summary['data_dir_mib']} MiB")
    print(f"health: {watch.health_checks} checks, {len(watch.health_failures)} not SERVING"
          + (f"; server died: {watch.died}" if watch.died else "")
          + ("; KILLED: RSS passed the ceiling" if watch.killed_for_rss else ""))
    for path in saved:
        print(f"reproducer: {path}")
    failed = tally.bad() or watch.died or watch.killed_for_rss or watch.health_failures
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
