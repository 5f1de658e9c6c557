"""lossd measured side by side with its peers (a benchmark, not a test).

One run: every side is a server in its own process, and the client sends
each the same load in alternating blocks (echo, sink, tf, ..., lossd, echo,
...), so a slow spell of this shared machine hits every side alike. Sides
(``--sides``, any subset):

- ``echo``: the anchor, containing none of lossd's code: a bare threaded
  ``grpc.server`` (8 threads, TensorFlow not imported) that answers 8
  prebuilt bytes (``bench/evaluate.py --echo-server``);
- ``sink``: the same server answering empty bytes: what receiving costs;
- ``tf``: a ~50-line grpcio server that parses lossd's ``EvaluateRequest``,
  decodes with ``numpy.frombuffer`` and calls one ``tf.function``; no
  interceptors, no checks (``run_tf_server`` below);
- ``mlserver``, ``mlserver-batch``: MLServer 1.7 (with uvloop 0.21) and a
  custom runtime computing the same loss with the same ``tf.function``,
  over gRPC v2 (the Open Inference Protocol); adaptive batching off, and on
  (``max_batch_size`` 32, ``max_batch_time`` 1 ms); its other settings are
  its defaults (one parallel worker process);
- ``kserve``: KServe 0.21's ``ModelServer`` with a custom ``Model`` computing
  the same loss, over gRPC v2, its defaults otherwise;
- ``lossd``: ``lossd serve`` with its defaults.
- ``lossd-oip``: the same server called through its Open Inference Protocol
  front end (``ModelInfer`` on model ``huber``, ``delta`` a request
  parameter, raw contents), serialized with lossd's own stubs of the
  protocol; the issue's goal is 0.9 of ``lossd``'s requests/s.

The load is issue 13's ragged mixed-delta Huber scenario
(``bench/concurrency.py``): 16 requests of 1-128 rows of 10 float32, each
with its own ``delta``, reduced over the batch, sent round-robin. Every
request is serialized before the clock starts, and each side gets the same
request in its own protocol: lossd's bytes for echo, sink, tf and lossd; an
OIP ``ModelInferRequest`` (inputs ``y_true`` and ``y_pred`` as
``raw_input_contents``, as Triton's clients send them; the loss name,
``delta`` and the row count as parameters of ``y_pred``, where MLServer's
batcher keeps them, see ``LossRuntime``) for MLServer and KServe, serialized
with the peer's own generated stubs.
Every side is sent raw bytes through the same generic ``grpc.aio`` stub, so
the client's work is the same for all. Before timing, each side's answers
are checked against Keras (``keras.losses.Huber``/``MeanSquaredError``).

Then the large case: one MSE request of ``--large`` float32 elements per
tensor (1e7: 80 MB a request), at concurrency 1, in the same alternation.

For each side and level it prints requests/s, the median (p50) and 99th
percentile (p99) latency of the client's calls, and the server's CPU time
per request (user + system of its whole process tree from ``/proc``,
children included, over the blocks), each with its ratio to the echo's (to
the sink's in the large case) and to lossd's.

The peers are benchmark-only: each is installed by this script into a
virtual environment of its own under ``--peers-dir`` (default
``~/.cache/lossd-bench``) with pip, never into the project's environment. A
peer that cannot be installed or started is reported with the error and
left out. Every server binds 127.0.0.1 on a free port, runs in its own
process group that is killed on exit (errors and Ctrl-C included), and is
stopped if its process tree's resident memory passes ``--max-rss-mib``.

Usage: python bench/peers.py [--sides echo,sink,tf,mlserver,mlserver-batch,kserve,lossd,lossd-oip]
           [--concurrency 1,8,64,256] [--blocks 3] [--block-seconds 4] [--large 1e7]
           [--peers-dir ~/.cache/lossd-bench] [--max-rss-mib 4096] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import pathlib
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

BENCH = pathlib.Path(__file__).resolve().parent
SIDES = ("echo", "sink", "tf", "mlserver", "mlserver-batch", "kserve", "lossd", "lossd-oip")
PEER_SIDES = {"mlserver": "mlserver", "mlserver-batch": "mlserver", "kserve": "kserve"}  # side -> its venv
PEER_PACKAGES = {
    "mlserver": ("mlserver==1.7.*", "uvloop==0.21.*", "tensorflow==2.21.*"),
    "kserve": ("kserve==0.21.*", "tensorflow==2.21.*"),
}
OIP_METHOD = "/inference.GRPCInferenceService/ModelInfer"
OIP_MODEL = "loss"
MESSAGE_OPTIONS = [("grpc.max_send_message_length", 256 << 20), ("grpc.max_receive_message_length", 256 << 20)]
MLSERVER_BATCH = {"max_batch_size": 32, "max_batch_time": 0.001}


# --- the loss every non-lossd side computes -----------------------------------------------------------------------

def loss_functions() -> dict:
    """One ``tf.function`` per loss, ``(y_true, y_pred, delta) -> scalar``,
    reduced as lossd reduces by default (sum over batch size); rows and
    columns are free, so each traces once."""
    import keras
    import tensorflow as tf

    matrix = tf.TensorSpec([None, None], tf.float32)
    scalar = tf.TensorSpec([], tf.float32)

    @tf.function(input_signature=[matrix, matrix, scalar])
    def huber(y_true, y_pred, delta):
        return tf.reduce_mean(keras.losses.huber(y_true, y_pred, delta))

    @tf.function(input_signature=[matrix, matrix, scalar])
    def mean_squared_error(y_true, y_pred, delta):
        return tf.reduce_mean(keras.losses.mean_squared_error(y_true, y_pred))

    return {"huber": huber, "mean_squared_error": mean_squared_error}


def run_tf_server(port: int) -> None:
    """The ``tf`` side: lossd's protocol served by grpcio, ``numpy.frombuffer``
    and one ``tf.function``; nothing else (no interceptors, checks, metrics)."""
    from concurrent import futures

    import grpc

    from lossd.v1 import loss_service_pb2, tensor_pb2

    functions = loss_functions()

    def evaluate(raw: bytes, context) -> bytes:
        request = loss_service_pb2.EvaluateRequest.FromString(raw)
        y_true = np.frombuffer(request.y_true.content, np.float32).reshape(request.y_true.shape)
        y_pred = np.frombuffer(request.y_pred.content, np.float32).reshape(request.y_pred.shape)
        params = request.loss.params.fields
        delta = params["delta"].number_value if "delta" in params else 1.0
        loss = functions[request.loss.name](y_true, y_pred, np.float32(delta)).numpy()
        return loss_service_pb2.EvaluateResponse(loss=tensor_pb2.Tensor(
            dtype=tensor_pb2.DATA_TYPE_FLOAT32, content=loss.tobytes())).SerializeToString()

    handler = grpc.method_handlers_generic_handler("lossd.v1.LossService", {
        "Evaluate": grpc.unary_unary_rpc_method_handler(evaluate)})
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8), options=MESSAGE_OPTIONS)
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    server.wait_for_termination()


# --- peer side (runs in the peer's venv: no lossd import) ---------------------------------------------------------

def _oip_pb2():
    """The OIP messages from the peer's own generated stubs."""
    try:
        from mlserver.grpc import dataplane_pb2
        return dataplane_pb2
    except ImportError:
        from kserve.protocol.grpc import grpc_predict_v2_pb2
        return grpc_predict_v2_pb2


def _oip_params(params) -> dict[str, list]:
    """An OIP input's parameters as lists, one value per request: MLServer
    merges the parameters of batched inputs into lists, KServe hands over
    the protobuf map."""
    if hasattr(params, "model_dump"):
        params = params.model_dump()
    out = {}
    for key in ("loss", "delta", "rows"):
        value = params[key]
        if hasattr(value, "WhichOneof"):
            value = getattr(value, value.WhichOneof("parameter_choice"))
        out[key] = value if isinstance(value, list) else [value]
    return out


def _oip_losses(functions: dict, y_true: np.ndarray, y_pred: np.ndarray, params, per_row: bool) -> np.ndarray:
    """The loss of each request in (possibly merged) inputs; ``per_row``:
    repeated over its rows, the output MLServer's batcher can split back."""
    p = _oip_params(params)
    out, start = [], 0
    for loss, delta, rows in zip(p["loss"], p["delta"], p["rows"]):
        rows = int(rows)
        value = functions[loss](y_true[start:start + rows], y_pred[start:start + rows],
                                np.float32(float(delta))).numpy()
        out.append(np.full(rows if per_row else 1, value, np.float32))
        start += rows
    return np.concatenate(out)


def _mlserver_runtime():
    from mlserver import MLModel
    from mlserver.codecs import NumpyCodec
    from mlserver.types import InferenceResponse

    class LossRuntime(MLModel):
        """An MLServer custom runtime evaluating one loss per request.

        MLServer's adaptive batching concatenates the inputs of several
        requests and tells the runtime neither where each begins nor their
        request parameters (the last request's win); parameters of inputs
        it does merge into one list per request. So each request carries
        its loss name, delta and row count as parameters of its ``y_pred``
        input, and with batching on the runtime answers each row with its
        request's loss, which the batcher splits back by rows (off, one
        value, as the other sides answer)."""

        async def load(self) -> bool:
            self._functions = loss_functions()
            self._per_row = self.settings.max_batch_size > 1 and self.settings.max_batch_time > 0
            return True

        async def predict(self, payload):
            inputs = {i.name: i for i in payload.inputs}
            y_true = NumpyCodec.decode_input(inputs["y_true"]).astype(np.float32, copy=False)
            y_pred = NumpyCodec.decode_input(inputs["y_pred"]).astype(np.float32, copy=False)
            losses = _oip_losses(self._functions, y_true, y_pred, inputs["y_pred"].parameters, self._per_row)
            return InferenceResponse(model_name=self.name, outputs=[NumpyCodec.encode_output("loss", losses)])

    return LossRuntime


def __getattr__(name: str):
    # MLServer imports its runtime by name (model-settings.json's
    # "implementation": "peers.LossRuntime"); built on first use so that this
    # module imports without MLServer.
    if name == "LossRuntime":
        return _mlserver_runtime()
    raise AttributeError(name)


def run_kserve_server(port: int, http_port: int, max_message: int) -> None:
    """The ``kserve`` side: KServe's ModelServer with a custom Model, its
    defaults except per-request log lines (off, as lossd runs at WARNING)
    and the listening addresses: KServe binds every interface ([::] for
    gRPC, 0.0.0.0 for REST) with no setting to choose, so they are
    rewritten to 127.0.0.1 here. Its gRPC message limit (8 MiB by default)
    is raised to ``max_message`` through the flags it reads from argv."""
    import logging

    sys.argv[1:] = ["--grpc_max_receive_message_length", str(max_message), "--grpc_max_send_message_length",
                    str(max_message)]

    import grpc
    import kserve
    import uvicorn
    from kserve.protocol.infer_type import InferOutput, InferResponse

    real_server, real_config = grpc.aio.server, uvicorn.Config

    def local_server(*args, **kwargs):
        server = real_server(*args, **kwargs)
        add = server.add_insecure_port
        server.add_insecure_port = lambda address: add(address.replace("[::]", "127.0.0.1"))
        return server

    grpc.aio.server = local_server
    uvicorn.Config = lambda *args, **kwargs: real_config(*args, **{**kwargs, "host": "127.0.0.1"})

    class LossModel(kserve.Model):
        def __init__(self):
            super().__init__(OIP_MODEL)
            self.functions = loss_functions()
            self.ready = True

        async def predict(self, payload, headers=None, response_headers=None):
            y_pred = payload.get_input_by_name("y_pred")
            losses = _oip_losses(self.functions, payload.get_input_by_name("y_true").as_numpy(), y_pred.as_numpy(),
                                 y_pred.parameters, per_row=False)
            return InferResponse(response_id=payload.id, model_name=self.name,
                                 infer_outputs=[InferOutput("loss", [1], "FP32", data=losses)])

    model = LossModel()
    server = kserve.ModelServer(http_port=http_port, grpc_port=port, enable_latency_logging=False)
    logging.getLogger("kserve").setLevel(logging.WARNING)
    logging.getLogger("kserve.trace").setLevel(logging.WARNING)
    server.start([model])


def write_frames(path: str, items: list[bytes]) -> None:
    with open(path, "wb") as f:
        for item in items:
            f.write(struct.pack("<Q", len(item)))
            f.write(item)


def read_frames(path: str) -> list[bytes]:
    out = []
    with open(path, "rb") as f:
        while header := f.read(8):
            out.append(f.read(struct.unpack("<Q", header)[0]))
    return out


def oip_encode(folder: str) -> None:
    """Writes ``folder/requests.bin``: one serialized ModelInferRequest per
    case of ``folder/cases.npz`` (see ``write_cases``)."""
    pb2 = _oip_pb2()
    cases = np.load(os.path.join(folder, "cases.npz"))
    meta = json.loads(str(cases["meta"]))
    out = []
    for i, (loss, delta) in enumerate(meta):
        y_true, y_pred = cases[f"y_true_{i}"], cases[f"y_pred_{i}"]
        request = pb2.ModelInferRequest(model_name=OIP_MODEL, raw_input_contents=[y_true.tobytes(), y_pred.tobytes()])
        for name, array in (("y_true", y_true), ("y_pred", y_pred)):
            request.inputs.add(name=name, datatype="FP32", shape=array.shape)
        params = request.inputs[1].parameters  # see LossRuntime: inputs' parameters survive MLServer's batching
        params["loss"].string_param = loss
        params["delta"].string_param = repr(delta)  # MLServer's OIP has no double_param; repr round-trips
        params["rows"].int64_param = len(y_true)
        out.append(request.SerializeToString())
    write_frames(os.path.join(folder, "requests.bin"), out)


def oip_decode(path: str) -> None:
    """Prints the ``loss`` of each ModelInferResponse in ``path`` as JSON."""
    pb2 = _oip_pb2()
    values = []
    for raw in read_frames(path):
        response = pb2.ModelInferResponse.FromString(raw)
        output = next(o for o in response.outputs if o.name == "loss")
        if response.raw_output_contents:
            values.append(float(np.frombuffer(response.raw_output_contents[0], np.float32)[0]))
        else:
            values.append(float(output.contents.fp32_contents[0]))
    print(json.dumps(values))


# --- bench side ------------------------------------------------------------------------------------------------------

class PeerUnavailable(Exception):
    """A peer that could not be installed or started; the message says why."""


def peer_python(name: str, root: pathlib.Path) -> pathlib.Path:
    """The python of ``name``'s own virtual environment under ``root``,
    created and filled from PyPI with pip the first time (and again when
    ``PEER_PACKAGES`` changes)."""
    venv = root / name
    python = venv / "bin" / "python"
    marker = venv / "lossd-bench-requirements.txt"
    wanted = "\n".join(PEER_PACKAGES[name]) + "\n"
    if python.exists() and marker.exists() and marker.read_text() == wanted:
        return python
    print(f"# installing {name} into {venv}: {' '.join(PEER_PACKAGES[name])} (once; minutes)", flush=True)
    root.mkdir(parents=True, exist_ok=True)
    steps = [] if python.exists() else [[sys.executable, "-m", "venv", str(venv)]]
    for step in steps + [[str(python), "-m", "pip", "install", "-q", *PEER_PACKAGES[name]]]:
        done = subprocess.run(step, capture_output=True, text=True)
        if done.returncode:
            lines = [line for line in (done.stdout + done.stderr).splitlines() if "is ignored" not in line]
            raise PeerUnavailable(f"{' '.join(step[:4])} failed (exit {done.returncode}): " + "\n".join(lines[-15:]))
    marker.write_text(wanted)
    return python


def process_children() -> dict[int, list[int]]:
    """Each process's children, from one pass over /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                with open(f"/proc/{entry.name}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry.name))
    return children


def tree_pids(root: int, children: dict[int, list[int]] | None = None) -> list[int]:
    """``root`` and every process below it."""
    children = process_children() if children is None else children
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += children.get(pid, [])
    return out


TICK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def tree_cpu_seconds(root: int) -> float:
    """User + system CPU seconds of ``root``'s process tree: each live
    process's own time plus what its exited children left (cutime, cstime)."""
    ticks = 0
    for pid in tree_pids(root):
        with contextlib.suppress(OSError):
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            ticks += sum(int(v) for v in fields[11:15])  # utime stime cutime cstime
    return ticks / TICK


def tree_rss_bytes(root: int, children: dict[int, list[int]]) -> int:
    total = 0
    for pid in tree_pids(root, children):
        with contextlib.suppress(OSError):
            with open(f"/proc/{pid}/statm") as f:
                total += int(f.read().split()[1]) * PAGE
    return total


class RssGuard(threading.Thread):
    """Kills a server's process group when its tree's resident memory passes
    ``limit`` bytes; ``tripped`` says which and how much. It looks once a
    second (one pass over /proc), so that it costs the client little."""

    def __init__(self, servers: dict[str, int], limit: int):
        super().__init__(daemon=True)
        self.servers, self.limit, self.tripped = servers, limit, None
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.wait(1.0):
            children = process_children()
            for side, pid in self.servers.items():
                rss = tree_rss_bytes(pid, children)
                if rss > self.limit:
                    self.tripped = f"{side}: {rss / 2**20:,.0f} MiB resident, over --max-rss-mib {self.limit >> 20:,}"
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(pid, 9)
                    return


def write_cases(folder: str, cases: list[tuple[np.ndarray, np.ndarray, str, float]]) -> None:
    arrays = {}
    for i, (y_true, y_pred, _, _) in enumerate(cases):
        arrays[f"y_true_{i}"], arrays[f"y_pred_{i}"] = y_true, y_pred
    np.savez(os.path.join(folder, "cases.npz"), meta=json.dumps([[loss, delta] for _, _, loss, delta in cases]),
             **arrays)


def decode_cases(payloads: list[bytes]) -> list[tuple[np.ndarray, np.ndarray, str, float]]:
    """(y_true, y_pred, loss name, delta) of each lossd request, read back
    from its bytes, so that every protocol carries exactly these values."""
    from lossd import wire
    from lossd.v1 import loss_service_pb2

    out = []
    for raw in payloads:
        request = loss_service_pb2.EvaluateRequest.FromString(raw)
        spec = wire.spec_to_dict(request.loss)
        out.append((wire.to_numpy(request.y_true), wire.to_numpy(request.y_pred), spec["name"],
                    float(spec.get("params", {}).get("delta", 1.0))))
    return out


def keras_reference(folder: str) -> None:
    """Prints Keras's own value of each case in ``folder/cases.npz`` as JSON."""
    import keras

    cases = np.load(os.path.join(folder, "cases.npz"))
    values = []
    for i, (loss, delta) in enumerate(json.loads(str(cases["meta"]))):
        fn = keras.losses.Huber(delta=delta) if loss == "huber" else keras.losses.MeanSquaredError()
        values.append(float(fn(cases[f"y_true_{i}"], cases[f"y_pred_{i}"])))
    print(json.dumps(values))


def run_json(args: list[str]) -> list:
    done = subprocess.run(args, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{' '.join(args[:3])} failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


class Side:
    """One server: how to start it, and what the client sends it."""

    def __init__(self, name: str, command: list[str], address: str, method: str, env: dict | None = None):
        self.name, self.command, self.address, self.method, self.env = name, command, address, method, env or {}
        self.pid = 0
        self.payloads: dict[str, list[bytes]] = {}  # per load: "small", "large"


def make_sides(names: list[str], work: str, peers_dir: pathlib.Path, max_message: int) -> tuple[dict, dict]:
    """The sides that can run, and why the others cannot."""
    from concurrency import EVALUATE_METHOD
    from evaluate import ECHO_METHOD, free_port

    evaluate_py = str(BENCH / "evaluate.py")
    sides, missing = {}, {}
    for name in names:
        port = free_port()
        address = f"127.0.0.1:{port}"
        if name in ("echo", "sink"):
            command = [sys.executable, evaluate_py, "--echo-server", str(port)]
            sides[name] = Side(name, command + (["--echo-answer-bytes", "0"] if name == "sink" else []), address,
                               ECHO_METHOD)
        elif name == "tf":
            sides[name] = Side(name, [sys.executable, __file__, "--serve-tf", str(port)], address, EVALUATE_METHOD)
        elif name in ("lossd", "lossd-oip"):
            sides[name] = Side(name, [sys.executable, "-m", "lossd.cli", "serve", "--port", str(port),
                                      "--metrics-port", "", "--data-dir", os.path.join(work, f"{name}-data"),
                                      "--log-level", "WARNING"], address,
                               EVALUATE_METHOD if name == "lossd" else OIP_METHOD)
        else:
            try:
                python = peer_python(PEER_SIDES[name], peers_dir)
            except PeerUnavailable as error:
                missing[name] = str(error)
                continue
            if name == "kserve":
                command = [str(python), __file__, "--serve-kserve", str(port), str(free_port()), str(max_message)]
            else:
                command = [str(python.parent / "mlserver"), "start", mlserver_folder(name, work, port, max_message)]
            sides[name] = Side(name, command, address, OIP_METHOD, env={"PYTHONPATH": str(BENCH)})
    return sides, missing


def mlserver_folder(name: str, work: str, port: int, max_message: int) -> str:
    """An MLServer model repository: its defaults, except the addresses, no
    debug logging, and adaptive batching for ``mlserver-batch``."""
    from evaluate import free_port

    folder = os.path.join(work, name)
    os.makedirs(os.path.join(folder, OIP_MODEL))
    settings = {"host": "127.0.0.1", "grpc_port": port, "http_port": free_port(), "metrics_port": free_port(),
                "debug": False, "grpc_max_message_length": max_message,
                "metrics_dir": os.path.join(folder, ".metrics")}  # its default, the working directory, is the repo
    model = {"name": OIP_MODEL, "implementation": "peers.LossRuntime",
             **(MLSERVER_BATCH if name == "mlserver-batch" else {})}
    with open(os.path.join(folder, "settings.json"), "w") as f:
        json.dump(settings, f)
    with open(os.path.join(folder, OIP_MODEL, "model-settings.json"), "w") as f:
        json.dump(model, f)
    return folder


def oip_payloads(python: str, work: str, load: str, cases) -> list[bytes]:
    folder = os.path.join(work, f"oip-{load}")
    os.makedirs(folder, exist_ok=True)
    if not os.path.exists(os.path.join(folder, "requests.bin")):
        write_cases(folder, cases)
        done = subprocess.run([python, __file__, "--oip-encode", folder], capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"encoding OIP requests failed: {done.stderr[-2000:]}")
    return read_frames(os.path.join(folder, "requests.bin"))


def lossd_oip_payloads(cases) -> list[bytes]:
    """ModelInferRequests for lossd's OIP front end: the loss is the model,
    ``delta`` a request parameter (docs/oip.md)."""
    from lossd_server.grpc.oip import grpc_predict_v2_pb2 as pb2

    out = []
    for y_true, y_pred, loss, delta in cases:
        request = pb2.ModelInferRequest(model_name=loss, raw_input_contents=[y_true.tobytes(), y_pred.tobytes()])
        for name, array in (("y_true", y_true), ("y_pred", y_pred)):
            request.inputs.add(name=name, datatype="FP32", shape=array.shape)
        if loss == "huber":
            request.parameters["delta"].double_param = delta
        out.append(request.SerializeToString())
    return out


def decode_answers(side: Side, answers: list[bytes], work: str, peers_dir: pathlib.Path) -> list[float]:
    """The loss in each of ``side``'s answers."""
    if side.name == "lossd-oip":
        from lossd_server.grpc.oip import grpc_predict_v2_pb2 as pb2

        return [float(np.frombuffer(pb2.ModelInferResponse.FromString(raw).raw_output_contents[0], np.float32)[0])
                for raw in answers]
    if side.method == OIP_METHOD:
        path = os.path.join(work, f"answers-{side.name}.bin")
        write_frames(path, answers)
        return run_json([str(peers_dir / PEER_SIDES[side.name] / "bin" / "python"), __file__, "--oip-decode", path])
    from lossd.v1 import loss_service_pb2

    return [float(np.frombuffer(loss_service_pb2.EvaluateResponse.FromString(raw).loss.content, np.float32)[0])
            for raw in answers]


class Totals:
    def __init__(self):
        self.done, self.seconds, self.cpu, self.latencies = 0, 0.0, 0.0, []

    def row(self) -> dict[str, float]:
        lat = np.asarray(self.latencies)
        return {"rate": self.done / self.seconds, "p50": float(np.percentile(lat, 50)) * 1e6,
                "p99": float(np.percentile(lat, 99)) * 1e6, "cpu": self.cpu / self.done * 1e6}


async def measure(sides: dict[str, Side], levels: list[tuple[str, int]], blocks: int, seconds: float,
                  guard: RssGuard) -> dict[tuple[str, int], dict[str, dict[str, float]]]:
    """Alternating blocks of every side at each (load, concurrency) level."""
    import grpc

    from concurrency import run_block

    channels = {name: grpc.aio.insecure_channel(side.address, options=MESSAGE_OPTIONS)
                for name, side in sides.items()}
    try:
        calls = {name: channels[name].unary_unary(side.method) for name, side in sides.items()}
        results = {}
        for load, concurrency in levels:
            totals = {name: Totals() for name in sides}
            for _ in range(blocks):
                for name, side in sides.items():
                    t = totals[name]
                    cpu = tree_cpu_seconds(side.pid)
                    start = time.perf_counter()
                    done, _ = await run_block(calls[name], side.payloads[load], concurrency, seconds, t.latencies)
                    t.seconds += time.perf_counter() - start
                    t.cpu += tree_cpu_seconds(side.pid) - cpu
                    t.done += done
                    if guard.tripped:
                        raise SystemExit(f"stopped: {guard.tripped}")
            results[(load, concurrency)] = {name: t.row() for name, t in totals.items()}
            print_level(load, concurrency, results[(load, concurrency)], blocks, seconds)
        return results
    finally:
        for channel in channels.values():
            await channel.close()


async def warm_up(sides: dict[str, Side], references: dict[str, list[float]], work: str,
                  peers_dir: pathlib.Path, log_of) -> None:
    """Waits until each side answers, sends every request once and checks
    the answers against Keras, then a crowd (programs compile on first use)."""
    import grpc

    from concurrency import warm_crowd

    for name, side in sides.items():
        async with grpc.aio.insecure_channel(side.address, options=MESSAGE_OPTIONS) as channel:
            call = channel.unary_unary(side.method)
            deadline = time.time() + 300
            while True:  # a peer's gRPC port may open before its model is loaded
                try:
                    await call(side.payloads["small"][0], timeout=60)
                    break
                except grpc.aio.AioRpcError as error:
                    if time.time() > deadline:
                        raise RuntimeError(f"{name} does not answer: {error.details()}\n{log_of(name)}") from error
                    await asyncio.sleep(1)
            for load, payloads in side.payloads.items():
                answers = [await call(p, timeout=600) for p in payloads]
                if name in ("echo", "sink"):
                    continue
                got = np.asarray(decode_answers(side, answers, work, peers_dir))
                wrong = ~np.isclose(got, references[load], rtol=1e-5, atol=0)
                if wrong.any():  # reported, and the side still measured: what a peer answers is part of its result
                    i = int(np.argmax(wrong))
                    print(f"# {name}: WRONG {load} answers: {wrong.sum()} of {len(got)} differ from Keras's, "
                          f"e.g. {got[i]!r} where Keras gives {references[load][i]!r}", flush=True)
                else:
                    print(f"# {name}: {load} answers checked against Keras", flush=True)
            await warm_crowd(call, side.payloads["small"])


def ratio(value: float, base: float | None) -> str:
    return f"{value / base:6.2f}" if base else f"{'-':>6}"


def print_level(load: str, concurrency: int, rows: dict[str, dict[str, float]], blocks: int, seconds: float) -> None:
    anchor = "sink" if load == "large" and "sink" in rows else "echo"
    a, lossd = rows.get(anchor), rows.get("lossd")
    what = f"{load} load" if load != "large" else "large MSE request"
    print(f"\n## {what}, concurrency {concurrency}, {blocks} blocks x {seconds:g} s per side; "
          f"ratios: the side's value over the {anchor}'s (x{anchor}) and lossd's (xlossd)")
    large = load == "large"
    unit, per = ("ms", 1e-3) if large else ("µs", 1.0)  # a large request takes seconds
    print(f"{'side':<15}{'MB/s' if large else 'req/s':>9}{'x' + anchor:>7}{'xlossd':>7}{'p50 ' + unit:>11}"
          f"{'x' + anchor:>7}{'xlossd':>7}{'p99 ' + unit:>11}{'x' + anchor:>7}{'xlossd':>7}"
          f"{f'CPU {unit}/req':>12}{'x' + anchor:>7}{'xlossd':>7}")
    for name, r in rows.items():
        line = f"{name:<15}{r['rate'] * LARGE_BYTES / 1e6:>9,.1f}" if large else f"{name:<15}{r['rate']:>9,.0f}"
        line += ratio(r["rate"], a and a["rate"]).rjust(7) + ratio(r["rate"], lossd and lossd["rate"]).rjust(7)
        for key, width in (("p50", 11), ("p99", 11), ("cpu", 12)):
            line += f"{r[key] * per:>{width},.{1 if large else 0}f}" + ratio(r[key], a and a[key]).rjust(7)
            line += ratio(r[key], lossd and lossd[key]).rjust(7)
        print(line, flush=True)


LARGE_BYTES = 0  # request tensor bytes of the large case, set by main


def main() -> int:
    global LARGE_BYTES
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sides", default=",".join(SIDES), help=f"comma-separated, of {', '.join(SIDES)}")
    parser.add_argument("--concurrency", help="requests in flight, comma-separated (default 1,8,64,256)")
    parser.add_argument("--blocks", type=int, help="blocks per side and level (default 3)")
    parser.add_argument("--block-seconds", type=float, help="default 4")
    parser.add_argument("--large", type=float,
                        help="float32 elements per tensor of the MSE case (default 1e7; 0 leaves it out)")
    parser.add_argument("--peers-dir", default=os.path.expanduser("~/.cache/lossd-bench"),
                        help="where the peers' virtual environments live")
    parser.add_argument("--max-rss-mib", type=int, default=4096, help="stop a server whose processes pass this")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run; its defaults: concurrency 1,8, 2 blocks of 0.5 s, a 1e5-element large case")
    parser.add_argument("--serve-tf", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--serve-kserve", type=int, nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--oip-encode", help=argparse.SUPPRESS)
    parser.add_argument("--oip-decode", help=argparse.SUPPRESS)
    parser.add_argument("--reference", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_tf:
        return run_tf_server(args.serve_tf)
    if args.serve_kserve:
        return run_kserve_server(*args.serve_kserve)
    if args.oip_encode:
        return oip_encode(args.oip_encode)
    if args.oip_decode:
        return oip_decode(args.oip_decode)
    if args.reference:
        return keras_reference(args.reference)
    # SIGTERM (timeout, kill) ends the run as Ctrl-C does: through the with
    # blocks that stop every server started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    sys.path.insert(0, str(BENCH))
    from concurrency import requests
    from evaluate import process, wait_ready

    from lossd import _requests, wire

    names = [n for n in args.sides.split(",") if n]
    unknown = sorted(set(names) - set(SIDES))
    if unknown:
        parser.error(f"--sides: unknown {', '.join(unknown)}. Expected some of {', '.join(SIDES)}")
    for key, normal, quick in (("concurrency", "1,8,64,256", "1,8"), ("blocks", 3, 2), ("block_seconds", 4.0, 0.5),
                               ("large", 1e7, 1e5)):
        if getattr(args, key) is None:
            setattr(args, key, quick if args.quick else normal)
    levels = [("small", int(c)) for c in args.concurrency.split(",")]
    large = int(args.large)
    if large:
        levels.append(("large", 1))
    peers_dir = pathlib.Path(args.peers_dir).expanduser()

    rng = np.random.default_rng(0)
    small = requests(16, rng)
    loads = {"small": small}
    cases = {"small": decode_cases(small)}
    if large:
        rows = max(1, large // 10)
        y_true, y_pred = (rng.normal(size=(rows, 10)).astype("float32") for _ in range(2))
        loads["large"] = [_requests.evaluate_request(wire.spec_from_dict("mean_squared_error"),
                                                     _requests.prepare(y_true, y_pred), "sum_over_batch_size",
                                                     False).SerializeToString()]
        cases["large"] = [(y_true, y_pred, "mean_squared_error", 1.0)]
        LARGE_BYTES = y_true.nbytes + y_pred.nbytes
        del y_true, y_pred

    with tempfile.TemporaryDirectory(prefix="lossd-peers-") as work, contextlib.ExitStack() as stack:
        max_message = max(256 << 20, 2 * LARGE_BYTES)
        sides, missing = make_sides(names, work, peers_dir, max_message)
        for name, why in missing.items():
            print(f"# {name} left out: {why}", flush=True)

        def log_of(name: str) -> str:
            with open(os.path.join(work, f"{name}.log"), errors="replace") as f:
                return "".join(f.readlines()[-20:])

        # All start at once, each in its own process group that is killed
        # when the with block ends; TensorFlow imports take a while here, so
        # the requests and Keras's values are made meanwhile.
        for side in sides.values():
            side.pid = stack.enter_context(process(side.command, env=side.env,
                                                   log=os.path.join(work, f"{side.name}.log"))).pid
        references = {}
        for load, load_cases in cases.items():
            folder = os.path.join(work, f"reference-{load}")
            os.makedirs(folder)
            write_cases(folder, load_cases)
            references[load] = run_json([sys.executable, __file__, "--reference", folder])
        for side in sides.values():
            if side.name == "lossd-oip":
                side.payloads = {load: lossd_oip_payloads(load_cases) for load, load_cases in cases.items()}
            elif side.method == OIP_METHOD:
                python = str(peers_dir / PEER_SIDES[side.name] / "bin" / "python")
                side.payloads = {load: oip_payloads(python, work, load, load_cases)
                                 for load, load_cases in cases.items()}
            else:
                side.payloads = loads
        print(f"# lossd bench/peers.py  cpus {os.cpu_count()}  load average {os.getloadavg()[0]:.1f}  sides "
              f"{', '.join(sides)}  small: 16 ragged Huber requests (1-128 x 10 float32, own delta)"
              + (f"  large: MSE of {large:.0e} float32 elements per tensor" if large else ""), flush=True)
        guard = RssGuard({name: side.pid for name, side in sides.items()}, args.max_rss_mib << 20)
        guard.start()
        stack.callback(guard.halt.set)
        for name, side in sides.items():
            try:
                wait_ready(side.address, timeout=300)
            except RuntimeError as error:
                raise SystemExit(f"{name} did not start: {error}\n{log_of(name)}") from error
        asyncio.run(warm_up(sides, references, work, peers_dir, log_of))
        asyncio.run(measure(sides, levels, args.blocks, args.block_seconds, guard))
    return 0


if __name__ == "__main__":
    sys.exit(main())
