"""Fuzzes every lossd RPC against a real server (a bench script, not a test).

It starts ``lossd serve`` as a subprocess with its own data directory, free
ports, small limits (``fuzzing.SMALL_LIMITS``: 1 MiB messages, 100k
elements per tensor, 256 KiB uploads, 4 training steps a job, 2 queued jobs)
and a tokens file made by ``lossd tokens create`` (``user``: evaluate and
train; ``admin``; ``evaluate``). It trains one tiny classifier and one tiny
generator so that Predict, Generate, WatchJob and DownloadArtifact reach real
models, then sends ``--requests`` calls drawn from the proto schema of the
loss, training, shared-memory and health services by ``tests/fuzzing.py``
(random messages, near-valid ones with one field mutated, bytes that do not
parse; each with a credential drawn from ``fuzzing.CREDENTIALS``: a token
with the scopes, one without, none, a forged one) from ``--processes``
client processes of ``--clients`` threads each, each call with a deadline.
Each process draws with its own seed (``seed * 1000 + its index``), so the
drawing, which costs as much CPU as a call, is not one thread's.

While it runs it samples the server's RSS and thread count (/proc), checks
gRPC health every few seconds, and kills the server if its RSS passes
``--rss-ceiling``. At the end it prints the calls and status codes per RPC,
the server's peak RSS (VmHWM), and saves every INTERNAL/UNKNOWN answer as a
reproducer (``findings/*.json``, with the server's traceback beside it).

Exits 1 on any INTERNAL/UNKNOWN, a server that died or passed the RSS
ceiling, or health that stopped answering SERVING.

Usage: python -m bench.fuzz [--requests 100000] [--processes 3] [--clients 2] [--deadline 5] [--seed 0]
                           [--minutes 30] [--rss-ceiling 2] [--no-tokens] [--out DIR]
       python -m bench.fuzz --replay findings/0001-Evaluate.json [--address HOST:PORT] [--tokens OUT/tokens.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import os
import pathlib
import queue
import re
import resource
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
# The tokens the server is started with: CREDENTIALS label -> scopes.
TOKENS = {"user": "evaluate,train", "admin": "admin", "evaluate": "evaluate"}
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


def cpu_seconds(pid: int) -> float:
    """User plus system CPU seconds of a process, from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


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


def make_tokens(folder: pathlib.Path) -> tuple[pathlib.Path, dict[str, str]]:
    """A tokens file with one token per ``TOKENS`` label, made by ``lossd
    tokens create`` as a user makes them; returns it and label -> token
    (also saved as ``tokens.json``, mode 0600, for ``--replay``)."""
    path = folder / "tokens.jsonl"
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOSSD_")}
    tokens = {}
    for label, scopes in TOKENS.items():
        done = subprocess.run([sys.executable, "-m", "lossd.cli", "tokens", "create", f"fuzz-{label}", "--scopes",
                               scopes, "--file", str(path)], env=env, capture_output=True, text=True, timeout=120)
        if done.returncode:
            raise SystemExit(f"lossd tokens create failed: {done.stderr}")
        tokens[label] = done.stdout.strip()
    saved = folder / "tokens.json"
    saved.write_text(json.dumps(tokens), encoding="utf-8")
    saved.chmod(0o600)
    return path, tokens


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
    """Trains a tiny classifier and a tiny generator (4 steps each), as the
    ``user`` token's caller, so that near-valid Predict, Generate and
    DownloadArtifact calls reach real models."""
    metadata = ctx.metadata("user")
    channel = grpc.insecure_channel(address)
    jobs = training_service_pb2_grpc.TrainingServiceStub(channel)
    made = []
    for preset, params in (("mlp", {"hidden_units": [4]}), ("vae", {"filters": [2], "latent_dim": 2})):
        spec = tpb.JobSpec(dataset="digits", epochs=1, steps_per_epoch=4, batch_size=8)
        spec.model.preset = preset
        spec.model.params.CopyFrom(fuzzing.make_struct(params))
        made.append((preset, jobs.CreateJob(tpb.CreateJobRequest(spec=spec), timeout=60, metadata=metadata).name))
    deadline = time.monotonic() + timeout
    names = []
    for preset, name in made:
        while time.monotonic() < deadline:
            job = jobs.GetJob(tpb.GetJobRequest(name=name), timeout=30, metadata=metadata)
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


def cancel_leftovers(address: str, ctx: fuzzing.Context) -> None:
    """Cancels every job the fuzzing left queued or running (as ``admin``, who sees all)."""
    metadata = ctx.metadata("admin")
    with grpc.insecure_channel(address) as channel:
        jobs = training_service_pb2_grpc.TrainingServiceStub(channel)
        try:
            listed = jobs.ListJobs(tpb.ListJobsRequest(page_size=1000, states=[
                tpb.Job.STATE_QUEUED, tpb.Job.STATE_RUNNING]), timeout=30, metadata=metadata).jobs
        except grpc.RpcError:
            listed = []
        for name in {*ctx.jobs, *(job.name for job in listed)}:
            try:
                jobs.CancelJob(tpb.CancelJobRequest(name=name), timeout=10, metadata=metadata)
            except grpc.RpcError:
                pass


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


def fuzz_process(address: str, known: dict, count: int, clients: int, deadline: float, seed_: int,
                 stop, sent, results) -> None:
    """One client process: ``fuzzing.run`` of ``count`` calls with ``clients``
    threads; ``sent`` follows its count, ``stop`` (a multiprocessing Event)
    ends it early; its tally goes to ``results`` as JSON-able data."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops it through ``stop``
    ctx = fuzzing.Context(**known)
    ended = threading.Event()

    def follow_stop():
        while not ended.is_set():
            if stop.wait(0.5):
                ended.set()

    threading.Thread(target=follow_stop, daemon=True).start()

    def progress(tally: fuzzing.Tally) -> None:
        sent.value = tally.count

    tally = fuzzing.Tally()
    try:
        fuzzing.run(address, ctx, count, clients=clients, timeout=deadline, seed_=seed_, stop=ended, tally=tally,
                    progress=progress)
    finally:  # whatever ends it, its tally so far goes back
        ended.set()
        report(tally, results)


def report(tally: fuzzing.Tally, results) -> None:
    """Puts a client process's tally on ``results`` as JSON-able data."""
    bad = [{"code": f.code, "details": f.details, **f.call.to_json()} for f in tally.findings]
    hangs = [{"code": f.code, "details": f.details, **f.call.to_json()} for f in tally.hangs]
    results.put({"codes": {m: dict(c) for m, c in tally.codes.items()},
                 "items": {m: dict(c) for m, c in tally.items.items()},
                 "cleanup": dict(tally.cleanup), "findings": bad, "hangs": hangs})


def merge(parts: list[dict]) -> fuzzing.Tally:
    """One tally of the client processes' results."""
    tally = fuzzing.Tally()
    for part in parts:
        for table, counts in ((tally.codes, part["codes"]), (tally.items, part["items"])):
            for method, codes in counts.items():
                table[method].update(codes)
        tally.cleanup.update(part["cleanup"])
        for kind, found in ((tally.findings, part["findings"]), (tally.hangs, part["hangs"])):
            found_calls = [fuzzing.Finding(fuzzing.Call.from_json(f), f["code"], f["details"]) for f in found]
            kind.extend(found_calls)
    return tally


def fuzz(address: str, ctx: fuzzing.Context, args, stop: threading.Event, progress) -> fuzzing.Tally:
    """Sends ``args.requests`` calls from ``args.processes`` client processes
    (started with spawn: grpcio's threads do not survive a fork) until done or
    ``stop``."""
    spawn = multiprocessing.get_context("spawn")
    known = dict(loss_names=list(ctx.loss_names), jobs=list(ctx.jobs), classifier_jobs=list(ctx.classifier_jobs),
                 generator_jobs=list(ctx.generator_jobs), tokens=dict(ctx.tokens))
    halt, results = spawn.Event(), spawn.Queue()
    counters = [spawn.Value("q", 0) for _ in range(args.processes)]
    shares = [args.requests // args.processes + (i < args.requests % args.processes) for i in range(args.processes)]
    processes = [spawn.Process(target=fuzz_process, args=(address, known, share, args.clients, args.deadline,
                                                          args.seed * 1000 + i, halt, counter, results))
                 for i, (share, counter) in enumerate(zip(shares, counters))]
    for process in processes:
        process.start()
    parts = []
    last = time.monotonic()

    def collect(wait: float) -> bool:
        try:
            parts.append(results.get(timeout=wait))
        except queue.Empty:
            return any(p.is_alive() for p in processes)  # False: a process died without its tally
        return True

    try:
        while len(parts) < len(processes):
            if stop.is_set():
                halt.set()
            if not collect(0.5):
                break
            if time.monotonic() - last > 10:
                last = time.monotonic()
                progress(sum(c.value for c in counters))
    except KeyboardInterrupt:
        print("interrupted: stopping the clients", flush=True)
        halt.set()
        until = time.monotonic() + 60
        while len(parts) < len(processes) and time.monotonic() < until and collect(1.0):
            pass
    for process in processes:
        process.join(30)
        if process.is_alive():
            process.kill()
    lost = len(processes) - len(parts)
    if lost:
        print(f"{lost} client process(es) ended without a tally", flush=True)
    return merge(parts)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=100_000, help="calls to send (default 100000)")
    parser.add_argument("--processes", type=int, default=3, help="client processes (default 3)")
    parser.add_argument("--clients", type=int, default=2,
                        help="threads sending calls at once in each client process (default 2)")
    parser.add_argument("--deadline", type=float, default=5.0, help="seconds each call may take (default 5)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the drawing (default 0)")
    parser.add_argument("--rss-ceiling", type=float, default=2.0,
                        help="GiB of server RSS that fails the run (default 2)")
    parser.add_argument("--minutes", type=float, default=0.0, help="stop after this long (0: no limit)")
    parser.add_argument("--no-seed-jobs", action="store_true", help="skip training the two tiny models first")
    parser.add_argument("--no-tokens", action="store_true", help="serve without tokens (every call unauthenticated)")
    parser.add_argument("--tokens", type=pathlib.Path, help="with --replay: the run's tokens.json")
    parser.add_argument("--out", type=pathlib.Path,
                        help="folder for the log, summary and findings (default: a temp dir)")
    parser.add_argument("--replay", type=pathlib.Path, help="send one saved reproducer to --address, print its code")
    parser.add_argument("--address", default="127.0.0.1:50051", help="server for --replay")
    args = parser.parse_args(argv)
    # SIGTERM ends the run like Ctrl-C: the server is stopped and the tally printed.
    signal.signal(signal.SIGTERM, _interrupt)

    if args.replay:
        tokens = json.loads(args.tokens.read_text(encoding="utf-8")) if args.tokens else {}
        print(fuzzing.replay(args.address, str(args.replay), args.deadline, tokens))
        return 0

    out = args.out or pathlib.Path(tempfile.mkdtemp(prefix="lossd-fuzz-"))
    out.mkdir(parents=True, exist_ok=True)
    data_dir = out / "data"
    log_path = out / "server.log"
    print(f"output in {out}", flush=True)
    ctx = fuzzing.Context()
    limits = dict(fuzzing.SMALL_LIMITS)
    if not args.no_tokens:
        limits["tokens_file"], ctx.tokens = make_tokens(out)
    process, port = start_server(data_dir, log_path, limits)
    address = f"127.0.0.1:{port}"
    stop = threading.Event()
    watch = Watch()
    watcher = threading.Thread(target=monitor, args=(process, address, watch, stop, int(args.rss_ceiling * GiB / 1024)),
                               daemon=True)
    watcher.start()
    tally = fuzzing.Tally()
    fuzz_seconds = 1e-9
    server_cpu_start = clients_cpu_start = 0.0
    try:
        with grpc.insecure_channel(address) as channel:
            losses = loss_service_pb2_grpc.LossServiceStub(channel).ListLosses(
                loss_service_pb2.ListLossesRequest(), timeout=30, metadata=ctx.metadata("user")).losses
            ctx.loss_names[:] = sorted({name for d in losses for name in (d.name, *d.aliases)})
        if not args.no_seed_jobs:
            train_seed_jobs(address, ctx, timeout=300)
        if args.minutes:
            timer = threading.Timer(args.minutes * 60, stop.set)
            timer.daemon = True  # a run that ends first does not wait for it
            timer.start()

        def progress(count: int) -> None:
            rate = count / max(1e-9, time.monotonic() - fuzz_start)
            print(f"{count:>7} calls, {rate:5.0f}/s, server RSS peak {watch.peak_rss_kb / 1024:.0f} MiB, "
                  f"threads {watch.peak_threads}", flush=True)

        fuzz_start = time.monotonic()
        server_cpu_start = cpu_seconds(process.pid)
        clients_cpu_start = sum(getattr(resource.getrusage(resource.RUSAGE_CHILDREN), f)
                                for f in ("ru_utime", "ru_stime"))
        tally = fuzz(address, ctx, args, stop, progress)
        fuzz_seconds = time.monotonic() - fuzz_start
    finally:
        stop.set()
        watcher.join()
        try:
            final = read_status(process.pid)
            server_cpu = cpu_seconds(process.pid) - server_cpu_start
        except OSError:
            final, server_cpu = {}, 0.0
        # The client processes have been joined (reaped): their CPU is in RUSAGE_CHILDREN.
        clients_cpu = sum(getattr(resource.getrusage(resource.RUSAGE_CHILDREN), f) for f in ("ru_utime", "ru_stime"))
        clients_cpu -= clients_cpu_start
        if process.poll() is None:
            cancel_leftovers(address, ctx)
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
        "processes": args.processes, "clients": args.clients, "deadline": args.deadline,
        "tokens": not args.no_tokens, "seed": args.seed, "internal_or_unknown": tally.bad(),
        "deadline_exceeded": sum(c["DEADLINE_EXCEEDED"] for c in tally.codes.values()),
        "peak_rss_mib": round(max(final.get("VmHWM", 0), watch.peak_rss_kb) / 1024, 1),
        "peak_sampled_rss_mib": round(watch.peak_rss_kb / 1024, 1),
        "peak_job_processes_rss_mib": round(watch.peak_children_rss_kb / 1024, 1),
        "peak_threads": watch.peak_threads, "server_cpu_seconds": round(server_cpu, 1),
        "client_processes_cpu_seconds": round(clients_cpu, 1), "rss_samples": watch.samples,
        "health_checks": watch.health_checks, "health_failures": watch.health_failures,
        "server_died": watch.died, "killed_for_rss": watch.killed_for_rss,
        "data_dir_mib": round(directory_bytes(data_dir) / 2**20, 1),
        "codes": {method: dict(counts) for method, counts in tally.codes.items()},
        "stream_answers": {method: dict(counts) for method, counts in tally.items.items()},
        "cleanup_cancels": dict(tally.cleanup),
        "findings": [str(p) for p in saved],
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
    print(f"\n{tally.count} calls in {fuzz_seconds:.0f} s ({summary['rate_per_second']}/s), {args.processes} "
          f"processes x {args.clients} clients; "
          f"INTERNAL/UNKNOWN: {tally.bad()}; DEADLINE_EXCEEDED: {summary['deadline_exceeded']}")
    print(f"server peak RSS (VmHWM) {summary['peak_rss_mib']} MiB; peak threads {watch.peak_threads}; "
          f"job processes peak RSS {summary['peak_job_processes_rss_mib']} MiB; data dir {summary['data_dir_mib']} MiB")
    print(f"CPU while fuzzing: server {server_cpu:.0f} s, client processes {clients_cpu:.0f} s")
    print(f"health: {watch.health_checks} checks, {len(watch.health_failures)} not SERVING"
          + (f"; server died: {watch.died}" if watch.died else "")
          + ("; KILLED: RSS passed the ceiling" if watch.killed_for_rss else ""))
    for path in saved:
        print(f"reproducer: {path}")
    failed = tally.bad() or watch.died or watch.killed_for_rss or watch.health_failures
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
