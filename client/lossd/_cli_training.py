"""``lossd jobs ...`` and ``lossd datasets ...``: training from the command line."""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
from typing import Callable, Optional



from lossd.cli import UsageError, client_flags, client_from as _client, load_npy, parse_pairs as _pairs


def _job_line(job) -> str:
    p = job.progress
    metrics = "  ".join(f"{k}={v:.4f}" for k, v in sorted(p.get("metrics", {}).items()))
    spec = job.spec
    return (f"{job.name}  {job.state:<10} {spec.get('model', {}).get('preset', '?'):<4} on "
            f"{spec.get('dataset', '?'):<12} epoch {p.get('epochs_completed', 0)}/{p.get('epochs', 0)}  {metrics}"
            + (f"  owner={job.owner}" if job.owner else ""))


def _job_json(job) -> dict:
    return {"name": job.name, "state": job.state, "display_name": job.display_name, "model_kind": job.model_kind,
            "owner": job.owner,
            "spec": job.spec, "progress": job.progress,
            "create_time": job.create_time.isoformat() if job.create_time else None,
            "start_time": job.start_time.isoformat() if job.start_time else None,
            "end_time": job.end_time.isoformat() if job.end_time else None,
            "error": {"reason": job.error.reason, "message": job.error.message,
                      "metadata": job.error.metadata} if job.error else None}


def cmd_jobs_create(args) -> int:
    loss = None
    if args.loss:
        kind = "expression" if args.loss.startswith("expr:") else "name"
        loss = {kind: args.loss.removeprefix("expr:"), "params": _pairs(args.loss_param, "--loss-param")}
    with _client(args) as client:
        job = client.create_job(
            args.model, args.dataset, loss=loss, model_params=_pairs(args.param, "--param"),
            optimizer=args.optimizer, learning_rate=args.learning_rate,
            optimizer_params=_pairs(args.optimizer_param, "--optimizer-param"), epochs=args.epochs,
            batch_size=args.batch_size, validation_split=args.validation_split, metrics=args.metric or (),
            seed=args.seed, steps_per_epoch=args.steps_per_epoch, display_name=args.display_name,
            request_id=args.request_id, workers=args.workers)
        print(job.name)
        if args.wait:
            job = client.wait(job, progress=True)
            print(_job_line(job))
            return 0 if job.state == "succeeded" else 1
    return 0


def cmd_jobs_list(args) -> int:
    with _client(args) as client:
        jobs = client.list_jobs(args.state or (), limit=args.limit)
    if args.json:
        print(json.dumps([_job_json(j) for j in jobs], indent=2))
    else:
        for job in jobs:
            print(_job_line(job))
    return 0


def cmd_jobs_get(args) -> int:
    with _client(args) as client:
        job = client.get_job(args.job)
    print(json.dumps(_job_json(job), indent=2))
    return 0


def cmd_jobs_watch(args) -> int:
    with _client(args) as client:
        job = client.wait(args.job, progress=True, file=sys.stdout)
    return 0 if job.state == "succeeded" else 1


def cmd_jobs_cancel(args) -> int:
    with _client(args) as client:
        job = client.cancel_job(args.job)
    print(f"{job.name} {job.state}")
    return 0


ARCHIVE_SUFFIXES = (".tar.gz", ".tgz")


def cmd_jobs_download(args) -> int:
    out = pathlib.Path(args.output)
    if args.artifact == "tensorboard" and not out.is_dir() and not out.name.endswith(ARCHIVE_SUFFIXES):
        # `-o tb`: a folder of logs for `tensorboard --logdir tb`, not an archive named tb.
        print(download_tensorboard_folder(args, out))
        return 0
    with _client(args) as client:
        path = client.download(args.job, args.output, artifact=args.artifact)
    print(path)
    return 0


def download_tensorboard_folder(args, folder: pathlib.Path) -> pathlib.Path:
    """Downloads a job's TensorBoard archive beside ``folder`` and unpacks it
    into ``folder`` (made if missing); returns the folder."""
    import tarfile
    import tempfile

    folder.parent.mkdir(parents=True, exist_ok=True)
    with _client(args) as client, tempfile.TemporaryDirectory(dir=folder.parent) as tmp:
        archive = client.download(args.job, tmp, artifact="tensorboard")
        folder.mkdir(exist_ok=True)
        with tarfile.open(archive) as tar:
            if hasattr(tarfile, "data_filter"):  # Python 3.10.12+: no links out, no absolute paths
                tar.extractall(folder, filter="data")
            else:  # pragma: no cover - older Pythons
                for member in tar.getmembers():
                    if member.name.startswith("/") or ".." in pathlib.PurePath(member.name).parts or \
                            not (member.isfile() or member.isdir()):
                        raise UsageError(f"the server's TensorBoard archive holds {member.name!r}. Expected "
                                         "files and folders inside it")
                tar.extractall(folder)
    return folder


def cmd_jobs_plot(args) -> int:
    import tempfile

    with _client(args) as client, tempfile.TemporaryDirectory() as tmp:
        path = client.download(args.job, pathlib.Path(tmp) / "history.json", artifact="history")
        history = json.loads(path.read_text())
        # A stateful loss's latest state (matrix_crossentropy's matrix), drawn beside the curves.
        state = client.get_job(args.job).progress.get("loss_state") or {}
    out = pathlib.Path(args.output or f"{args.job.split('/')[-1]}-loss.png")
    plot_history(history, out, title=args.job, heat_maps=state)
    print(out)
    return 0


def cmd_jobs_generate(args) -> int:
    import numpy as np

    from lossd._images import save_image_grid
    from lossd._progress import GenerateBar

    guidance = None
    if args.guidance:
        kind = "expression" if args.guidance.startswith("expr:") else "name"
        guidance = {kind: args.guidance.removeprefix("expr:")}
    init = load_npy("--init", args.init) if args.init else None
    kwargs = dict(seed=args.seed, prompt=args.prompt, steps=args.steps, guidance=guidance,
                  guidance_scale=args.guidance_scale, init_images=init, init_weight=args.init_weight,
                  classifier=args.classifier)
    with _client(args) as client:
        if args.no_progress:
            images = client.generate(args.job, args.count, **kwargs)
        else:  # the stream's steps as a progress bar on stderr, as `jobs create --wait` draws one
            bar = GenerateBar(sys.stderr)
            for item in client.generate_stream(args.job, args.count, **kwargs):
                bar.update(item)
            images = item.images
    out = pathlib.Path(args.output or f"{args.job.split('/')[-1]}-samples.png")
    save_image_grid(images, out, scale=args.scale)
    if args.npy:
        np.save(args.npy, images)
    print(out)
    return 0


def plot_history(history: dict, path: pathlib.Path, *, title: str = "",
                 heat_maps: Optional[dict] = None) -> pathlib.Path:
    """Draws loss curves (``loss``/``val_loss`` and any other ``*loss``) to a PNG,
    with matplotlib when installed, else with Pillow; and, right of them, a
    heat map of each 2-d array in ``heat_maps`` (a stateful loss's state,
    such as ``matrix_crossentropy``'s matrix: rows the true classes, columns
    the predicted ones, 0 white to 1 dark)."""
    series = {k: v for k, v in history.items() if k.endswith("loss") and v}
    if not series:
        raise SystemExit("error: the history holds no loss values yet")
    maps = {name: m for name, m in (heat_maps or {}).items() if getattr(m, "ndim", 0) == 2}
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return _plot_with_pillow(series, path, title, maps)
    fig, axes = plt.subplots(1, 1 + len(maps), figsize=(7 + 4 * len(maps), 4.5), squeeze=False,
                             gridspec_kw={"width_ratios": [7] + [4] * len(maps)})
    ax = axes[0][0]
    for heat_ax, (name, matrix) in zip(axes[0][1:], sorted(maps.items())):
        image = heat_ax.imshow(matrix, cmap="Blues", vmin=0.0, vmax=1.0)
        heat_ax.set_title(f"loss state: {name}")
        heat_ax.set_xlabel("predicted class")
        heat_ax.set_ylabel("true class")
        fig.colorbar(image, ax=heat_ax, fraction=0.046)
    for name, values in sorted(series.items()):
        ax.plot(range(1, len(values) + 1), values, marker="o", label=name)
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


_COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]


HEAT_MAP_SIZE = 240  # pixels of one heat map's square, Pillow drawing
_HEAT_DARK = (8, 48, 107)  # the colour of 1 (matplotlib's "Blues" at its end)


def heat_color(value: float) -> tuple[int, int, int]:
    """The colour of a rate in a heat map: white at 0 (or below), dark blue at 1 (or above)."""
    v = min(max(float(value), 0.0), 1.0) if value == value else 0.0  # NaN draws as 0
    return tuple(round(255 + (dark - 255) * v) for dark in _HEAT_DARK)


def _plot_with_pillow(series: dict, path: pathlib.Path, title: str, heat_maps: Optional[dict] = None) -> pathlib.Path:
    try:
        from PIL import Image, ImageDraw
    except ImportError:
        raise SystemExit("error: `lossd jobs plot` needs matplotlib or Pillow: pip install pillow") from None
    heat_maps = heat_maps or {}
    width, height, left, right, top, bottom = 700, 450, 60, 20, 30, 40
    image = Image.new("RGB", (width + (HEAT_MAP_SIZE + 60) * len(heat_maps), height), "white")
    draw = ImageDraw.Draw(image)
    values = [v for vs in series.values() for v in vs]
    lo, hi = min(values), max(values)
    if hi == lo:
        hi = lo + 1.0
    epochs = max(len(vs) for vs in series.values())

    def xy(i: int, v: float) -> tuple[float, float]:
        x = left + (i / max(epochs - 1, 1)) * (width - left - right)
        y = top + (1 - (v - lo) / (hi - lo)) * (height - top - bottom)
        return x, y

    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    for k in range(5):  # y ticks
        v = lo + (hi - lo) * k / 4
        _, y = xy(0, v)
        draw.line([left - 4, y, left, y], fill="black")
        draw.text((4, y - 6), f"{v:.3g}", fill="black")
    for i in range(epochs):  # x ticks, one per epoch
        x, _ = xy(i, lo)
        draw.line([x, height - bottom, x, height - bottom + 4], fill="black")
        if epochs <= 20 or i % max(epochs // 10, 1) == 0:
            draw.text((x - 4, height - bottom + 6), str(i + 1), fill="black")
    draw.text((width // 2 - 20, height - 16), "epoch", fill="black")
    draw.text((left, 8), title, fill="black")
    for n, (name, vs) in enumerate(sorted(series.items())):
        color = _COLORS[n % len(_COLORS)]
        points = [xy(i, v) for i, v in enumerate(vs)]
        if len(points) > 1:
            draw.line(points, fill=color, width=2)
        for x, y in points:
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=color)
        draw.text((width - right - 150, top + 8 + 14 * n), f"- {name}", fill=color)
    for n, (name, matrix) in enumerate(sorted(heat_maps.items())):
        x0, y0 = width + 40 + n * (HEAT_MAP_SIZE + 60), top + 20
        rows, cols = matrix.shape
        cell_w, cell_h = HEAT_MAP_SIZE / max(cols, 1), HEAT_MAP_SIZE / max(rows, 1)
        for i in range(rows):
            for j in range(cols):
                draw.rectangle([x0 + j * cell_w, y0 + i * cell_h, x0 + (j + 1) * cell_w - 1,
                                y0 + (i + 1) * cell_h - 1], fill=heat_color(matrix[i, j]))
        draw.rectangle([x0 - 1, y0 - 1, x0 + HEAT_MAP_SIZE, y0 + HEAT_MAP_SIZE], outline="black")
        draw.text((x0, top), f"loss state: {name}", fill="black")
        draw.text((x0, y0 + HEAT_MAP_SIZE + 6), "predicted class ->", fill="black")
        draw.text((x0 - 34, y0 + HEAT_MAP_SIZE // 2), "true", fill="black")
    image.save(path)
    return path


def cmd_datasets_upload(args) -> int:
    path = pathlib.Path(args.path)
    if not path.is_file():  # said before any connection, not as a bare [Errno 2]
        raise UsageError(f"datasets upload: expected an existing .npz, .zip or .tar file. Received: {args.path!r} "
                         f"({'a directory' if path.is_dir() else 'no such file'})")
    with _client(args) as client:
        info = client.upload_dataset(args.path, name=args.name, replace=args.replace)
    print(f"{info.name}: {info.examples} images of {'x'.join(map(str, info.image_shape))}, "
          f"{len(info.class_names)} classes")
    return 0


def cmd_datasets_list(args) -> int:
    with _client(args) as client:
        infos = client.list_datasets()
    for info in infos:
        print(f"{info.name:<20} {info.source:<8} {info.examples:>8} images  {'x'.join(map(str, info.image_shape)):<10} "
              f"{len(info.class_names)} classes" + (f"  owner={info.owner}" if info.owner else ""))
    return 0


def cmd_datasets_delete(args) -> int:
    with _client(args) as client:
        client.delete_dataset(args.name)
    print(f"deleted {args.name}")
    return 0


def register(subparsers, client_parser: Callable[[str, str], argparse.ArgumentParser]) -> None:
    """Adds ``jobs`` and ``datasets`` (with their sub-commands) to the ``lossd`` parser.

    Args:
        subparsers: The top-level ``add_subparsers()`` object.
        client_parser: ``client_parser(name, help)`` from ``build_parser``: a
            sub-command with ``--address`` and ``--timeout``.
    """
    # --address/--timeout may also follow the sub-command (`lossd jobs list
    # --address ...`), as for every client command.
    common = client_flags()

    jobs = client_parser("jobs", "create, watch and use training jobs")
    jsub = jobs.add_subparsers(dest="jobs_command", required=True)

    p = jsub.add_parser("create", parents=[common], help="create a training job")
    p.add_argument("--model", default="cnn", help="model preset: cnn, mlp, vae or diffusion [cnn]")
    p.add_argument("--dataset", default="digits", help="digits, an uploaded dataset or folder:PATH [digits]")
    p.add_argument("--param", action="append", metavar="KEY=VALUE", help="model parameter (repeatable)")
    p.add_argument("--loss", help="a registered loss name, or expr:EXPRESSION [the model's default]")
    p.add_argument("--loss-param", action="append", metavar="KEY=VALUE", help="loss parameter (repeatable)")
    p.add_argument("--optimizer", default="adam", help="Keras optimizer name [adam]")
    p.add_argument("--learning-rate", type=float, default=None,
                   help="[the preset's with adam (diffusion 2e-3), else the optimizer's own]")
    p.add_argument("--optimizer-param", action="append", metavar="KEY=VALUE", help="optimizer parameter")
    p.add_argument("--epochs", type=int, default=0, help="[the preset's: 10, vae 60, diffusion 100]")
    p.add_argument("--batch-size", type=int, default=0, help="[the preset's: 32, diffusion 64]")
    p.add_argument("--validation-split", type=float, default=None, help="[0.2]")
    p.add_argument("--metric", action="append", help="Keras metric name (repeatable) [accuracy]")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps-per-epoch", type=int, default=0, help="cap on batches per epoch [all]")
    p.add_argument("--workers", type=int, default=0,
                   help="worker processes training one model together (MultiWorkerMirroredStrategy) [1]")
    p.add_argument("--display-name", default="")
    p.add_argument("--request-id", default=None, help="makes retries safe: same id, same job")
    p.add_argument("--wait", action="store_true", help="wait for the job, with a progress bar")
    p.set_defaults(func=cmd_jobs_create)

    p = jsub.add_parser("list", parents=[common], help="list jobs, newest first")
    p.add_argument("--state", action="append", choices=["queued", "running", "cancelling", "succeeded", "failed",
                                                        "cancelled"], help="only jobs in this state (repeatable)")
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_jobs_list)

    for name, func, help in (("get", cmd_jobs_get, "show a job as JSON"),
                             ("watch", cmd_jobs_watch, "follow a job with a progress bar until it ends"),
                             ("cancel", cmd_jobs_cancel, "cancel a queued or running job")):
        p = jsub.add_parser(name, parents=[common], help=help)
        p.add_argument("job", help="jobs/ID or ID")
        p.set_defaults(func=func)

    p = jsub.add_parser("download", parents=[common], help="download a job's model, history or TensorBoard logs")
    p.add_argument("job", help="jobs/ID or ID")
    p.add_argument("--artifact", choices=["model", "history", "tensorboard"], default="model")
    p.add_argument("-o", "--output", default=".",
                   help="a folder or file [.]; for tensorboard, a path not ending in .tar.gz or .tgz "
                        "gets the logs unpacked into it (tensorboard --logdir PATH)")
    p.set_defaults(func=cmd_jobs_download)

    p = jsub.add_parser("plot", parents=[common],
                        help="write a PNG of a job's loss curves (and a stateful loss's matrix as a heat map)")
    p.add_argument("job", help="jobs/ID or ID")
    p.add_argument("-o", "--output", help="the PNG [ID-loss.png]")
    p.set_defaults(func=cmd_jobs_plot)

    p = jsub.add_parser("generate", parents=[common],
                        help="write a PNG grid of images from a trained generator (vae, diffusion)")
    p.add_argument("job", help="jobs/ID or ID")
    p.add_argument("--count", type=int, default=16, help="images [16]")
    p.add_argument("--prompt", default="", help="the class to generate, by name (diffusion) [every class in turn]")
    p.add_argument("--steps", type=int, default=0, help="sampling steps (diffusion) [50, at most timesteps]")
    p.add_argument("--seed", type=int, default=0, help="[random]")
    p.add_argument("--classifier", default=None, help="a trained classifier job whose crossentropy for the "
                                                      "prompted class guides the samples")
    p.add_argument("--guidance", help="a registered loss name, or expr:EXPRESSION, over y_pred, y_true, "
                                      "classifier and label [classifier crossentropy]")
    p.add_argument("--guidance-scale", type=float, default=0.0, help="step along the guidance gradient [1]")
    p.add_argument("--init", help="a .npy of images to stay near (N or 1 x H x W x C)")
    p.add_argument("--init-weight", type=float, default=0.0, help="weight of init_weight/2 * mse(init, image) [0]")
    p.add_argument("--scale", type=int, default=4, help="pixels per image pixel in the PNG [4]")
    p.add_argument("--npy", help="also save the images as a .npy")
    p.add_argument("--no-progress", action="store_true", help="draw no progress bar (steps, ETA) on stderr")
    p.add_argument("-o", "--output", help="the PNG [ID-samples.png]")
    p.set_defaults(func=cmd_jobs_generate)

    datasets = client_parser("datasets", "upload, list and delete training datasets")
    dsub = datasets.add_subparsers(dest="datasets_command", required=True)
    p = dsub.add_parser("upload", parents=[common], help="upload an .npz or a zip/tar of class folders")
    p.add_argument("path")
    p.add_argument("--name", help="dataset name [the file name]")
    p.add_argument("--replace", action="store_true", help="overwrite an uploaded dataset of the same name")
    p.set_defaults(func=cmd_datasets_upload)
    p = dsub.add_parser("list", parents=[common], help="list datasets")
    p.set_defaults(func=cmd_datasets_list)
    p = dsub.add_parser("delete", parents=[common], help="delete an uploaded dataset")
    p.add_argument("name", help="the dataset's name, as `lossd datasets list` shows it")
    p.set_defaults(func=cmd_datasets_delete)
