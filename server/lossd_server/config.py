"""Server settings: one typed class, every field also a ``LOSSD_*`` environment
variable and a ``lossd serve --flag`` (the command line is generated from
these fields, so the three cannot drift apart)."""

from __future__ import annotations

import pathlib
from typing import Literal, Optional

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

MiB = 1 << 20
GiB = 1 << 30


class StartupError(RuntimeError):
    """The server cannot start for a reason a setting can fix (a port in use,
    no GPU where one was asked for). The message is one line that names the
    setting; ``lossd serve`` prints it and exits with status 2."""


class Settings(BaseSettings):
    """lossd server settings. Precedence: command line, environment, defaults."""

    model_config = SettingsConfigDict(env_prefix="LOSSD_", extra="forbid", use_attribute_docstrings=True)

    host: str = "127.0.0.1"
    """Address the gRPC server binds (``0.0.0.0`` to accept remote clients)."""

    port: int = Field(50051, ge=0, le=65535)
    """gRPC port; 0 picks a free one (the server logs which)."""

    health_port: Optional[int] = Field(None, ge=0, le=65535)
    """Plain-text port (on ``host``) that serves only grpc.health.v1's Check
    (no Watch streams), with the gRPC port's statuses, for probes that cannot
    speak TLS: Kubernetes' native gRPC probes. Unset (empty): none; 0 picks a
    free one."""

    http_port: Optional[int] = Field(None, ge=0, le=65535)
    """Port (on ``host``) of the Open Inference Protocol's REST form,
    ``/v2/...`` (docs/oip.md), with the gRPC port's TLS certificate and
    tokens. Unset (empty): off; 0 picks a free one."""
    warmup: bool = True
    """Before health turns SERVING, compile the losses most requests name
    (``lossd_server.app.WARMUP``: MSE, Huber and categorical crossentropy in
    float32, with and without gradient), so a new replica's first requests
    wait for no compilation. Costs 1-2 s at start here, 0.8 s of it
    TensorFlow's own start, which the first request would otherwise pay.
    The test suite turns it off (tests/conftest.py)."""

    metrics_host: str = "127.0.0.1"
    """Address of the Prometheus ``/metrics`` endpoint."""

    metrics_port: Optional[int] = Field(9464, ge=0, le=65535)
    """Port of the Prometheus ``/metrics`` endpoint; unset (empty) turns it off."""

    data_dir: pathlib.Path = pathlib.Path("lossd-data")
    """Directory for jobs, datasets, registered losses and trained models."""

    max_message_bytes: int = Field(256 * MiB, ge=MiB)
    """Largest gRPC message, sent or received. The default carries two
    16M-element float32 tensors; larger tensors travel through EvaluateChunked."""

    max_tensor_elements: int = Field(1_000_000_000, ge=1)
    """Most elements one tensor may claim; larger shapes are refused before
    anything is allocated."""

    max_broadcast_elements: int = Field(100_000_000, ge=1)
    """Most elements any value an expression loss computes may have (inside
    the expression, its values times sample_weight, a composite's sum of
    per-sample terms), computed from the input shapes before anything is
    traced: ``y_true - y_pred`` with shapes (N, 1) and (1, N) has N*N. 1e8
    float32 elements are 400 MB per intermediate, well above any real
    per-batch loss, and far below what would exhaust the host."""

    max_evaluation_cost: float = Field(5e9, gt=0)
    """Most work one evaluation may take, estimated from its shapes and dtypes
    before anything is compiled or allocated (``lossd_server.losses.cost``,
    docs/limits.md), in cost units of about one nanosecond of one core of the
    2-core reference machine: the default is about 5 s of CPU there. It
    counts what each loss's kernels walk: elements for elementwise losses,
    batch squared for ``circle``, time x batch x (2 x label length)^2 for
    ``ctc``, classes squared for ``matrix_crossentropy``, every node of an
    expression, the sum of a composite's terms; times 3 with the gradient.
    More is RESOURCE_EXHAUSTED (COST_TOO_HIGH). EvaluateChunked checks each
    chunk, and one row of the whole at its header."""

    max_evaluation_memory_bytes: int = Field(4 * GiB, ge=MiB)
    """Most bytes of intermediate values one evaluation may hold at once,
    estimated with ``max_evaluation_cost`` (the largest intermediates a
    loss computes, times about 3 with the gradient). 4 GiB admits an
    elementwise loss on a y_pred of up to 1 GiB (340 MiB, 89M float32
    elements, with its gradient), ``circle`` on up to about 9,000 rows and
    ``matrix_crossentropy`` on up to about 18,000 classes in float32; more
    is RESOURCE_EXHAUSTED (MEMORY_TOO_HIGH)."""

    max_composite_terms: int = Field(16, ge=1)
    """Most terms one composite loss may have (evaluation and training jobs);
    each term adds to the compiled program, and compiling holds a lock."""

    workers: int = Field(8, ge=1)
    """Threads serving RPCs. TensorFlow releases the GIL while it computes."""

    processes: int = Field(1, ge=1, le=256)
    """Serving processes on the one gRPC port (Linux ``SO_REUSEPORT``: the
    kernel spreads connections over them). Each has its own GIL, threads,
    compiled programs and per-process bounds; a small supervisor checks the
    ports, serves the one ``/metrics`` of all of them, forwards signals and
    restarts a process that dies. Jobs run in the first process only. A
    client spreads its calls with ``lossd.Client(..., connections=K)``.
    1 (the default): one process, no supervisor. See docs/scaling.md."""

    cache_size: int = Field(256, ge=1)
    """Most compiled loss programs kept (least recently used go first)."""

    device: Literal["auto", "cpu", "gpu"] = "auto"
    """Where losses are evaluated: ``auto`` takes the first GPU when there is one."""

    inter_op_threads: Optional[int] = Field(1, ge=0)
    """TensorFlow inter-op threads (0: TensorFlow's default). One keeps small
    evaluations on a warm thread; large tensors still use every core within an op."""

    xla: Literal["auto", "on", "off"] = "auto"
    """XLA (``jit_compile``) for loss programs (it replaces ``LOSSD_JIT_COMPILE``).
    ``auto``: on CPU, small requests whose rows are independent run as XLA
    executables padded to row buckets, compiled in the background (about 30
    µs a call instead of 100-220), and tensors of 2^20 elements or more use
    XLA for the losses measured faster with it; ``on``: XLA for every
    program as well (a new batch size then waits for its compilation);
    ``off``: none. XLA may reorder float operations: results agree with
    Keras to rtol 1e-6, not bit for bit (docs/xla.md)."""

    drain_seconds: float = Field(5.0, ge=0)
    """On SIGTERM/SIGINT, how long health says NOT_SERVING while the port stays
    open and new calls are still served, so load balancers stop routing here.
    After SIGINT (Ctrl-C at a terminal) it ends as soon as no call is in flight."""

    grace_seconds: float = Field(10.0, ge=0)
    """After the drain, how long in-flight calls may take to finish."""

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    """Log level; DEBUG logs one line per request."""

    log_format: Literal["text", "json"] = "text"
    """``json`` writes one JSON object per line, for log collectors."""

    @field_validator("metrics_port", "health_port", "http_port", "max_concurrent_jobs", "dataset_root", "inter_op_threads", "tls_cert",
                     "tls_key", "tls_client_ca", "tokens_file", "metrics_tls_cert", "metrics_tls_key",
                     "metrics_basic_auth_file", "database_url", "artifacts_dir", mode="before",
                     check_fields=False)
    @classmethod
    def _empty_is_unset(cls, value):
        # `LOSSD_METRICS_PORT=` (or `off`) in a compose file switches the feature off.
        if isinstance(value, str) and value.strip().lower() in ("", "none", "off"):
            return None
        return value

    # Transport security (issue 12).

    tls_cert: Optional[pathlib.Path] = None
    """PEM certificate chain for TLS on the gRPC port; unset serves plain text.
    Re-read when the file changes or on SIGHUP, for new connections."""

    tls_key: Optional[pathlib.Path] = None
    """PEM private key of ``tls_cert``."""

    tls_client_ca: Optional[pathlib.Path] = None
    """PEM CA certificates for mTLS: clients must present a certificate signed
    by one of them, or the handshake fails."""

    metrics_tls_cert: Optional[pathlib.Path] = None
    """PEM certificate chain for HTTPS on the metrics port; unset serves plain
    HTTP. It may be the gRPC port's certificate (``tls_cert``): set both to
    the same file. Re-read when the file changes or on SIGHUP, for new
    connections."""

    metrics_tls_key: Optional[pathlib.Path] = None
    """PEM private key of ``metrics_tls_cert``."""

    metrics_basic_auth_file: Optional[pathlib.Path] = None
    """File of ``user:pbkdf2_sha256$...`` lines (made by ``lossd metrics-auth
    create``); set, ``/metrics`` needs HTTP basic auth with one of them, and
    answers 401 otherwise. Re-read when it changes."""

    tokens_file: Optional[pathlib.Path] = None
    """File of bearer tokens (salted hashes, made by ``lossd tokens create``);
    every call but health and reflection then needs a token with the
    method's scope. Unset: no authentication (logged at start unless the
    server binds only loopback)."""

    @model_validator(mode="after")
    def _tls_complete(self):
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together: set both (LOSSD_TLS_CERT and LOSSD_TLS_KEY) or neither")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("tls_client_ca needs TLS: set tls_cert and tls_key too")
        if self.tls_client_ca is not None and self.http_port is not None:
            # The REST port checks tokens but not client certificates: it would be a way around mTLS.
            raise ValueError("http_port does not check client certificates (tls_client_ca) yet: unset "
                             "LOSSD_HTTP_PORT, or LOSSD_TLS_CLIENT_CA")
        if (self.metrics_tls_cert is None) != (self.metrics_tls_key is None):
            raise ValueError("metrics_tls_cert and metrics_tls_key go together: set both (LOSSD_METRICS_TLS_CERT "
                             "and LOSSD_METRICS_TLS_KEY) or neither")
        return self

    # Training jobs (lossd_server.training).

    max_concurrent_jobs: Optional[int] = Field(None, ge=0)
    """Training jobs run at once; unset means one per GPU, or 1 without a GPU.
    ``0``: this server runs no jobs. With ``database_url`` it still queues,
    lists, watches and cancels them, and the replicas that run jobs take them
    (an evaluator replica); with the embedded store nothing would run a job,
    so CreateJob is FAILED_PRECONDITION (NO_JOB_SLOTS)."""

    max_upload_bytes: int = Field(256 * MiB, ge=1)
    """Largest dataset upload file. What one dataset decodes to (its float32
    images: 4 bytes a pixel, where a PNG or a uint8 array holds about 1) may
    take 4 times this, and so may the files of an archive or a folder dataset;
    more is INVALID_ARGUMENT (UPLOAD_TOO_LARGE), known from the array headers
    or the archive's listing before anything is decoded."""

    dataset_root: Optional[pathlib.Path] = None
    """Folder whose sub-folders jobs may train on as ``folder:PATH``; unset turns that off."""

    max_decoding_bytes: int = Field(2 * GiB, ge=MiB)
    """Memory all datasets being decoded at once may hold, server-wide
    (uploads, and folder datasets checked at CreateJob). Each reserves what it
    is about to hold (arrays as loaded and as float32, image files and their
    pixels) before it holds it, and gives it back when done. One that does not
    fit beside the others is RESOURCE_EXHAUSTED (DECODE_BUDGET_EXHAUSTED); one
    that needs more than all of it is INVALID_ARGUMENT (UPLOAD_TOO_LARGE). The
    largest upload the default ``max_upload_bytes`` admits needs at most about
    1.6 GiB of it (a float64 ``.npz``; a uint8 one 1.25 GiB)."""

    max_dataset_bytes: int = Field(10 * GiB, ge=MiB)
    """Disk the uploaded datasets may take under the data directory, all
    together: stored datasets plus uploads being received or stored. An upload
    reserves its size before receiving it and its stored size before writing
    it; past the limit it is RESOURCE_EXHAUSTED (DATASET_STORAGE_FULL), and
    DeleteDataset frees space."""

    max_archive_members: int = Field(100_000, ge=1)
    """Most entries (files and folders) a zip or tar upload, the zip of an
    ``.npz`` or a folder dataset may have. They are counted with a stop at the
    limit before any is listed; more is INVALID_ARGUMENT (TOO_MANY_MEMBERS)."""

    mixed_precision: bool = False
    """Train in mixed float16 on GPUs (ignored on CPU, where it is slower)."""

    progress_every_batches: int = Field(10, ge=1)
    """A training job reports progress (loss, examples/s, ETA) every this many batches."""

    # Bounds on what one request can make the server spend (issue 11).

    max_training_steps: int = Field(10_000_000, ge=1)
    """Most training steps one job may ask for: epochs × steps per epoch (a
    whole-dataset epoch counts its batches). Larger jobs are refused at CreateJob."""

    max_model_parameters: int = Field(20_000_000, ge=1)
    """Most parameters a job's model may have, counted from its preset's
    parameters and the dataset's image shape before anything is built."""

    max_training_cost: float = Field(1e16, gt=0)
    """Most multiply-adds one training job may take, estimated at CreateJob
    from its model, image shape, batch size, steps and epochs before it is
    queued (``lossd_server.training.cost``, docs/limits.md): three forward
    passes' worth (forward and backward) for every example trained on, plus
    one forward pass of the validation examples each epoch. The default,
    1e16, admits 100 epochs of the default ``diffusion`` on 50,000 32x32
    RGB images (9.9e14, batch 64) and refuses, say, 100,000 epochs in batches of
    65,536; the reference machine's ``cnn`` job trains at about 8.7e9
    multiply-adds/s. More is RESOURCE_EXHAUSTED (TRAINING_COST_TOO_HIGH)."""

    max_training_memory_bytes: int = Field(8 * GiB, ge=MiB)
    """Most bytes of activations and weights one training job may hold,
    estimated with ``max_training_cost``: one batch's layer outputs (kept for
    the backward pass, with their gradients) and the weights with their
    gradients and two optimizer slots, in float32. More is
    RESOURCE_EXHAUSTED (TRAINING_MEMORY_TOO_HIGH)."""

    max_generate_pixel_steps: int = Field(1 << 25, ge=1)
    """Most work one Generate may ask of a diffusion model: count × steps ×
    the image's values (height × width × channels). Larger requests are
    refused before any step runs (INVALID_ARGUMENT, GENERATION_TOO_LARGE)."""

    max_queued_jobs: int = Field(100, ge=1)
    """Most jobs waiting to run; CreateJob beyond it is RESOURCE_EXHAUSTED (TOO_MANY_JOBS)."""

    min_free_disk_bytes: int = Field(1 * GiB, ge=0)
    """Free space the data directory's file system must keep: below it,
    UploadDataset and CreateJob are RESOURCE_EXHAUSTED (DISK_NEARLY_FULL)
    before they write anything, so running jobs can still checkpoint and
    nothing stored is damaged; evaluation goes on. 0 turns the check off."""

    max_registered_losses: int = Field(1000, ge=1)
    """Most registered expression losses; a new one beyond it is RESOURCE_EXHAUSTED
    (TOO_MANY_LOSSES). Replacing a registered loss is always allowed."""

    # Threads, compilation and metrics (issue 11): what streams, new programs
    # and scrapes may take from the threads that serve evaluation.

    max_streams: int = Field(32, ge=1)
    """Most streaming calls open at once (WatchJob, EvaluateStream,
    EvaluateChunked, uploads, downloads). Each has a thread of its own beside
    the ``workers`` that serve unary calls and health, so streams cannot
    starve them; one more is RESOURCE_EXHAUSTED (TOO_MANY_STREAMS)."""

    max_streams_per_caller: int = Field(8, ge=1)
    """Most of the ``max_streams`` one token's caller may hold at once, so one
    caller cannot take every other token holder's streams. Not applied on a
    server without tokens (there is no caller to tell apart)."""

    max_unauthenticated_streams: int = Field(4, ge=1)
    """Most of the ``max_streams`` held at once by callers without a token:
    health watches, reflection, and calls refused for want of one."""

    stream_idle_seconds: float = Field(60.0, gt=0)
    """A stream on which the client sends nothing (or WatchJob has nothing to
    send) for this long is closed with DEADLINE_EXCEEDED (STREAM_IDLE);
    ``lossd`` clients resume a watch where it stopped."""

    max_program_nodes: int = Field(1024, ge=1)
    """Most expression parts one loss may have, summed over a composite's
    terms (a named loss counts as one); tracing time and a compiled program's
    memory grow with them. Larger is INVALID_ARGUMENT (PROGRAM_TOO_LARGE)."""

    # Micro-batching of evaluations (issue 13).

    batch_max_delay_us: int = Field(0, ge=0)
    """Longest a request waits for other requests of its program family (same
    loss, dtype and shapes past the first axis) to be evaluated with it in one
    call, in microseconds; 0 (the default) turns batching off. A request waits
    only while other requests are in flight: alone, it is evaluated at once.
    Off by default: on the 2-core reference machine it did not raise
    throughput, and it makes a reduced loss's last bits depend on what else is
    in flight (README, Micro-batching)."""

    batch_max_elements: int = Field(65_536, ge=1)
    """Most y_pred elements, over all its requests, in one batched call; a
    batch that reaches it runs at once, and a larger request runs on its own."""

    batch_max_requests: int = Field(64, ge=1)
    """Most requests in one batched call (1 turns batching off)."""

    compile_workers: int = Field(2, ge=1)
    """Threads that compile new loss programs. Requests whose program is
    already compiled never wait for them."""

    max_pending_compiles: int = Field(4, ge=1)
    """Most requests waiting for a program to compile; one more is
    RESOURCE_EXHAUSTED (COMPILE_BUSY). Each waits on one of the ``workers``
    threads: keep it below ``workers`` so health and compiled programs always
    find a thread."""

    compile_timeout_seconds: float = Field(30.0, gt=0)
    """Longest a request waits for its program to compile; past it the request
    is RESOURCE_EXHAUSTED (COMPILE_TIMEOUT) and the compilation goes on, so a
    retry finds it compiled."""

    cache_max_ops: int = Field(250_000, ge=1)
    """Most graph operations the cached compiled programs hold together (about
    8 KB each: 250k is about 2 GB); the least recently used go first."""

    # Admission control (issue 12): what evaluations may hold at once, and
    # how long they may wait for it (lossd_server.evaluation.admission).

    max_inflight_bytes: int = Field(GiB, ge=MiB)
    """Declared tensor bytes (dtype size times shape, all of a request's
    tensors) that running evaluations may hold together: Evaluate, each
    EvaluateStream item, each EvaluateChunked chunk. Checked from the shapes
    before anything is decoded. The default is four of the largest requests
    the default max_message_bytes (256 MiB) carries; evaluation's working set
    is a small multiple of its inputs (README, "Admission control"), so the
    default keeps evaluation within a few GiB, well inside this project's
    23 GiB machine or an 8 GiB container. A request that does not fit waits
    (see ``max_queued_requests``); one larger than all of it is
    INVALID_ARGUMENT (REQUEST_TOO_LARGE)."""

    max_queued_requests: int = Field(4, ge=0)
    """Most evaluations waiting for room in ``max_inflight_bytes``; one more
    is RESOURCE_EXHAUSTED (QUEUE_FULL) with a retry delay. Each waits on one of
    the ``workers`` threads (or its stream's): keep it below ``workers``."""

    max_queue_seconds: float = Field(2.0, ge=0)
    """Longest an evaluation waits for room (or less, to its deadline); then
    RESOURCE_EXHAUSTED (INFLIGHT_BYTES_FULL) with a retry delay."""

    # Fair sharing between callers (issue 23; docs/limits.md, "Fair sharing").

    evaluation_slots: int = Field(6, ge=1)
    """Evaluations (Evaluate calls, EvaluateStream items) that run at once on a
    server with tokens, shared fairly between callers: each caller's share is
    this divided by the callers active now, at least ``min_caller_slots``; a
    caller alone may use them all. Keep it below ``workers``, so a caller
    arriving while another holds every slot, and health, find a thread. Not
    applied on a server without tokens (there is no caller to tell apart)."""

    min_caller_slots: int = Field(1, ge=1)
    """The least share of ``evaluation_slots`` (and of ``max_pending_compiles``)
    a caller has, however many callers are active."""

    max_caller_queued: int = Field(1, ge=1)
    """Most evaluations (and compile waits) of one caller waiting for a slot
    past its share, each at most ``max_queue_seconds``; one more is
    RESOURCE_EXHAUSTED (CALLER_SHARE_FULL, or COMPILE_BUSY) with a retry
    delay, refused before its message is read."""

    # The heavy lane (issue 23; docs/limits.md, "The heavy lane").

    heavy_evaluation_cost: float = Field(1e9, ge=0)
    """Cost units (``LOSSD_MAX_EVALUATION_COST``'s, about a nanosecond of one
    reference core each) above which an evaluation runs in a heavy-lane
    worker process, at a lower CPU priority, killed when its call is
    cancelled or passes its deadline. The default, about a second of CPU, is
    far above any small request (an MSE on a million elements costs 2e6)."""

    heavy_workers: int = Field(1, ge=0)
    """Heavy-lane worker processes (heavy evaluations running at once), each
    started on first use and holding its own TensorFlow (a few hundred MiB);
    0 runs heavy evaluations in the server's process, as small ones."""

    heavy_max_queued: int = Field(4, ge=0)
    """Most heavy evaluations waiting for a worker, all callers together
    (each caller's also within its share of ``evaluation_slots``, since each
    holds one); one more is RESOURCE_EXHAUSTED (HEAVY_LANE_FULL) with a
    retry delay."""

    heavy_queue_seconds: float = Field(30.0, ge=0)
    """Longest a heavy evaluation waits for a worker (or less, to its
    deadline); then RESOURCE_EXHAUSTED (HEAVY_LANE_FULL) with a retry delay."""

    heavy_nice: int = Field(10, ge=0, le=19)
    """What each heavy-lane worker adds to its CPU niceness (``os.nice``), so
    the server's own threads, serving small evaluations and health, run first
    when the cores are busy."""

    # Shared memory for clients on the server's host (issue 13,
    # lossd_server.shared_memory).

    shm: bool = True
    """Let clients on this host hand tensors over through POSIX shared memory
    (``SharedMemoryService``; Linux only). A region must be named under
    ``lossd_`` and belong to the server's own user; it is unlinked when its
    client's session ends. False: the service is not offered (UNIMPLEMENTED)
    and clients fall back to gRPC."""

    shm_max_regions: int = Field(8, ge=1)
    """Most shared-memory regions one caller may have registered at once."""

    shm_max_bytes: int = Field(4 * GiB, ge=MiB)
    """Most bytes of shared-memory regions one caller may have registered at
    once. Mapping costs the server address space, not memory: the pages are
    the client's. A 1e7-element float32 evaluation with its gradient needs
    about 120 MB."""

    shm_max_total_bytes: int = Field(16 * GiB, ge=MiB)
    """Most bytes of shared-memory regions the server maps at once, over
    every caller."""

    metrics_cache_seconds: float = Field(1.0, ge=0)
    """``/metrics`` is rendered at most once per this many seconds and served
    from that rendering, so many scrapers cost evaluation nothing more."""

    metrics_rate_per_address: float = Field(10.0, gt=0)
    """Most HTTP requests per second the metrics port answers for one client
    address; more wait their turn, so a scraper in a loop costs evaluation
    no more than this (Prometheus scrapes once per interval)."""

    max_loss_labels: int = Field(100, ge=0)
    """Most registered losses that get a ``loss`` label value of their own in
    metrics (the first evaluated); the rest count as ``other``. Built-in and
    plugin losses always have theirs."""

    # Persisted state and faults (issue 11): job retries after a worker crash.

    job_max_retries: int = Field(2, ge=0)
    """How many times a job whose process died abnormally (killed, out of
    memory, exited without reporting an error) is started again from its last
    checkpoint before it fails with WORKER_CRASHED. Each retry is a job event."""

    # One job over several worker processes (issue 15).

    max_job_workers: int = Field(4, ge=1)
    """Most worker processes one job may ask for (JobSpec ``workers``). A job
    with ``workers: N`` also takes N of this replica's job slots
    (``max_concurrent_jobs``), so it is refused when N exceeds them."""

    job_collective_timeout_seconds: float = Field(30.0, gt=0)
    """How long a worker of a multi-worker job waits in one collective
    operation (the gradient all-reduce) for the other workers before it
    fails; bounds how long a job whose worker died can hang. The scheduler
    itself stops the others within a second of seeing one worker exit."""

    # Shared state for several replicas (issue 15).

    database_url: Optional[str] = None
    """PostgreSQL database for jobs, job events, datasets, registered losses
    and owners, shared by every replica (``postgresql://user:password@host/db``;
    any libpq connection string). Unset: SQLite in the data directory, for
    one server. The schema is created and migrated at start."""

    database_pool_size: int = Field(8, ge=1)
    """Most connections one server opens to ``database_url``."""

    artifacts_dir: Optional[pathlib.Path] = None
    """Folder for job folders (checkpoints, trained models) and uploaded
    datasets; unset: the data directory. With ``database_url``, point every
    replica at the same shared volume, so any replica can run, resume and
    serve any job."""

    replica_id: str = ""
    """This server's name in job leases and in the job events that say which
    replica took a job over; unset: ``<hostname>-<pid>``."""

    job_lease_seconds: float = Field(30.0, gt=0)
    """How long a replica's claim on a running job lasts without renewal; it
    renews it every third of this while the job runs. A job whose replica
    died is resumed from its checkpoint by another replica once the lease
    runs out."""

    shared_state_poll_seconds: float = Field(0.5, gt=0)
    """With ``database_url``: how often a replica checks the database for
    losses other replicas registered or deleted (one indexed read)."""
