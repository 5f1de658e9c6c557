"""The server's commands of ``lossd``: ``serve``, ``tokens``, ``metrics-auth``
and ``secrets``.

They reach the ``lossd`` command through the ``lossd.commands`` entry point
(``register``, named in pyproject.toml), so the client's ``lossd.cli``
imports nothing from ``lossd_server``. Importing this module is cheap: the
server's settings (pydantic), its auth code and TensorFlow are imported
only when a command of theirs runs (``serve``'s flags when ``serve`` is
parsed), so ``lossd --help`` and the client commands stay fast.
"""

from __future__ import annotations

import argparse
import difflib
import logging
import os
import re
import sys

# Where each setting appears in ``lossd serve --help``: the first group with
# a prefix the setting's name starts with (or equals). A new setting lands in
# a group by its name; tests/client/test_cli_flags.py fails for one that fits none.
SETTING_GROUPS = (
    ("TLS", ("tls_", "metrics_tls_")),
    ("auth", ("tokens_file", "metrics_basic_auth_file")),
    ("observability", ("log_", "metrics_", "max_loss_labels")),
    ("training", ("job_", "max_job_", "dataset_", "max_dataset_", "max_upload_", "max_decoding_", "max_archive_",
                  "max_training_", "max_model_", "max_generate_", "max_queued_jobs", "max_concurrent_jobs",
                  "mixed_precision", "progress_")),
    ("state", ("data_dir", "database_", "artifacts_dir", "replica_id", "shared_state_")),
    ("evaluation", ("warmup", "device", "inter_op_threads", "xla", "cache_", "batch_", "compile_",
                    "max_pending_compiles", "shm", "heavy_")),
    ("network", ("host", "port", "health_port", "http_port", "max_message_bytes", "workers", "processes", "drain_", "grace_")),
    ("limits", ("max_", "min_", "stream_", "evaluation_slots")),
)
OTHER_GROUP = "other"
# The order ``lossd serve --help`` shows the groups in.
GROUP_ORDER = ("network", "TLS", "auth", "limits", "evaluation", "training", "state", "observability", OTHER_GROUP)

_LITERAL = re.compile(r"``([^`]*)``")
_FIRST_SENTENCE = re.compile(r"(.+?[.!?])(?=\s+[A-Z(]|$)")


def setting_group(name: str) -> str:
    """The ``lossd serve --help`` group of the setting ``name``."""
    for group, prefixes in SETTING_GROUPS:
        if any(name == p or (p.endswith("_") and name.startswith(p)) or name.startswith(p + "_") for p in prefixes):
            return group
    return OTHER_GROUP


def one_line(doc: str) -> str:
    """A setting's docstring as one plain line for ``--help``: its first
    sentence, with the reStructuredText literals (````x````) unquoted. The
    whole text is in docs/settings.md."""
    text = " ".join(_LITERAL.sub(r"\1", doc or "").split())
    found = _FIRST_SENTENCE.match(text)
    return found.group(1) if found else text


def _default(value) -> str:
    return "unset" if value is None else str(value)


def _metavar(field) -> str:
    """What a flag's value looks like, from its type: the choices of a
    Literal, true|false, N, SECONDS, PATH, else VALUE."""
    import typing

    kinds = [a for a in typing.get_args(field.annotation) if a is not type(None)] or [field.annotation]
    kind = kinds[0]
    if typing.get_origin(kind) is typing.Literal:
        return "{" + ",".join(map(str, typing.get_args(kind))) + "}"
    if kind is bool:
        return "true|false"
    if kind is int:
        return "N"
    if kind is float:
        return "X"
    if getattr(kind, "__name__", "") in ("Path", "PosixPath"):
        return "PATH"
    return "VALUE"


def add_settings_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per server setting, generated from the Settings class so the
    flags, the LOSSD_* variables and docs/settings.md cannot drift apart, in
    argument groups (network, TLS, auth, limits, ...) with one line of help
    each. Runs when ``lossd serve`` is parsed, not before."""
    try:
        from lossd_server.config import Settings
    except ImportError:  # only the thin client's dependencies: cmd_serve says what to install
        return
    parser.usage = "%(prog)s [-h] [--SETTING VALUE ...]"
    groups = {name: parser.add_argument_group(f"{name} settings") for name in GROUP_ORDER}
    for name in sorted(Settings.model_fields, key=lambda n: GROUP_ORDER.index(setting_group(n))):
        field = Settings.model_fields[name]
        groups[setting_group(name)].add_argument(
            f"--{name.replace('_', '-')}", dest=name, default=None, metavar=_metavar(field),
            help=f"{one_line(field.description)} (default: {_default(field.default)})")


def unknown_variables(environ, settings) -> list[str]:
    """A warning for each ``LOSSD_*`` variable in ``environ`` that is neither
    one of ``settings`` nor read by the client commands: the settings'
    reader passes such names over, so a misspelt one would change nothing
    without a word."""
    from lossd.cli import CLIENT_ENV

    known = {f"LOSSD_{name.upper()}" for name in settings}
    warnings = []
    for name in sorted(environ):
        if name.startswith("LOSSD_") and name not in known and name not in CLIENT_ENV:
            close = difflib.get_close_matches(name, sorted(known), n=1)
            warnings.append(f"{name} is not a setting of lossd serve and changes nothing"
                            f"{f'; did you mean {close[0]}?' if close else ' (see lossd serve --help)'}")
    return warnings


def _needs_server(command: str, exc: Exception | None = None) -> int:
    print(f'error: `lossd {command}` needs the server: pip install "lossd[server]"{f" ({exc})" if exc else ""}',
          file=sys.stderr)
    return 2


def cmd_serve(args: argparse.Namespace) -> int:
    """Runs the server with the settings of the flags, the LOSSD_* variables and the defaults."""
    try:
        from lossd_server.observability import logs
        from lossd_server.config import Settings, StartupError
        from lossd_server.supervisor import run as serve  # imports TensorFlow only once the ports are checked
        import pydantic
    except ImportError as exc:
        return _needs_server("serve", exc)

    overrides = {k: v for k, v in vars(args).items() if k in Settings.model_fields and v is not None}
    try:
        settings = Settings(**overrides)
    except pydantic.ValidationError as exc:
        print(f"error: invalid settings:\n{exc}", file=sys.stderr)
        return 2
    logs.configure(settings.log_level, settings.log_format)
    for warning in unknown_variables(os.environ, Settings.model_fields):
        logging.getLogger("lossd_server.app").warning("%s", warning)
    try:
        return serve(settings)
    except StartupError as exc:  # a port in use, no GPU for LOSSD_DEVICE=gpu: one line, no traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _create_secret(args: argparse.Namespace, command: str, env: str, what: str, create) -> int:
    """Runs ``create(path)`` (which imports the server lazily) on the file of
    ``--file`` or ``env``, and prints the secret it returns once: on stdout,
    so it can be piped into a file, with a note on stderr."""
    path = args.file or os.environ.get(env)
    if not path:
        print(f"error: no {what} file: set --file or {env}", file=sys.stderr)
        return 2
    try:
        secret, note = create(path)
    except ImportError:
        return _needs_server(command)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(secret)
    print(f"# {note}; shown once, only its hash is in {path}", file=sys.stderr)
    return 0


def cmd_tokens_create(args: argparse.Namespace) -> int:
    """Appends a token's salted hash to the tokens file and prints the token, once."""
    def create(path):
        from lossd_server.security.tokens import Limits, create_token

        scopes = [s.strip() for s in args.scopes.split(",") if s.strip()]
        limits = Limits(elements_per_second=args.rate, max_jobs=args.max_jobs,
                        max_upload_bytes=args.max_upload_bytes)
        return create_token(path, args.name, scopes, limits), f"token of {args.name!r} ({args.scopes})"

    return _create_secret(args, "tokens", "LOSSD_TOKENS_FILE", "tokens", create)


def _on_tokens_file(args: argparse.Namespace, run) -> int:
    """Runs ``run(path, auth)`` on the tokens file of ``--file`` or
    LOSSD_TOKENS_FILE, with the server's ``lossd_server.security.tokens`` imported
    lazily; a file that is not a tokens file, or a refusal, is one line on
    stderr and exit status 2."""
    path = args.file or os.environ.get("LOSSD_TOKENS_FILE")
    if not path:
        print("error: no tokens file: set --file or LOSSD_TOKENS_FILE", file=sys.stderr)
        return 2
    try:
        from lossd_server.config import StartupError
        from lossd_server.security import tokens as auth
    except ImportError:
        return _needs_server("tokens")
    try:
        return run(path, auth)
    except (StartupError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def cmd_tokens_list(args: argparse.Namespace) -> int:
    """Prints the tokens file's tokens: name, id, scopes and limits; never a
    secret (the file holds none, and its salted hashes are not shown)."""
    def run(path, auth):
        records = sorted(auth.load_tokens(path).values(), key=lambda r: (r.name, r.id))
        rows = [("NAME", "ID", "SCOPES", "LIMITS")] + [
            (r.name, r.id, ",".join(sorted(r.scopes)),
             " ".join(f"{k}={v:g}" for k, v in r.limits.to_dict().items()) or "-") for r in records]
        widths = [max(len(row[i]) for row in rows) for i in range(3)]
        for row in rows:
            print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[3])
        return 0

    return _on_tokens_file(args, run)


def cmd_tokens_revoke(args: argparse.Namespace) -> int:
    """Removes every token of a caller from the tokens file; a running server
    refuses them within a second (it re-reads the file when it changes)."""
    def run(path, auth):
        removed = auth.revoke_tokens(path, args.name)
        print(f"revoked {removed} token(s) of {args.name!r} in {path}; a running server refuses them within a "
              "second", file=sys.stderr)
        return 0

    return _on_tokens_file(args, run)


def cmd_metrics_auth_create(args: argparse.Namespace) -> int:
    """Appends a metrics user's PBKDF2 hash to the basic-auth file and prints its password, once."""
    def create(path):
        from lossd_server.security.basic_auth import create_user

        return create_user(path, args.name), f"password of metrics user {args.name!r}"

    return _create_secret(args, "metrics-auth", "LOSSD_METRICS_BASIC_AUTH_FILE", "basic-auth", create)


def cmd_secrets_init(args: argparse.Namespace) -> int:
    """Makes the secrets folder of a deployment: a CA, the server's certificate,
    the metrics user and its password, an empty tokens file. Prints no secret."""
    try:
        from lossd_server.security.secrets import CA_KEY, SERVER_DAYS, init_secrets
    except ImportError:
        return _needs_server("secrets init")
    try:
        made = init_secrets(args.folder, args.host or ())
    except (ValueError, OSError) as exc:  # an existing secret (named), a bad --host, an unwritable folder
        print(f"error: {exc}", file=sys.stderr)
        return 2
    tokens = made.path("tokens.jsonl")
    print(f"""made {made.folder} (mode 700):
  ca.pem, {CA_KEY}          a new CA; clients trust ca.pem ({CA_KEY} stays here, mode 600)
  server.pem, server.key  its certificate for {', '.join(made.hosts)}, valid {SERVER_DAYS} days (to {made.not_after:%Y-%m-%d})
  metrics-users           the "prometheus" user of /metrics basic auth
  metrics-password        its password, for Prometheus
  tokens.jsonl            no tokens yet: lossd tokens create NAME --scopes evaluate,train --file {tokens}
files mode 644 (the containers' users read them), except {CA_KEY}""")
    return 0


def register(commands) -> None:
    """The ``lossd.commands`` entry point: adds the server's commands to
    ``commands``, the ``lossd`` parser's sub-command action. Its parsers take
    ``before_parse=``, which fills ``serve``'s flags in only when ``serve``
    is parsed (``lossd.cli.LazyParser``)."""
    serve = commands.add_parser(
        "serve", help="run the server (settings also from LOSSD_* variables)", before_parse=add_settings_flags,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run the lossd server.\n\n"
                    "Every flag is also an environment variable: --max-streams is LOSSD_MAX_STREAMS.\n"
                    "The command line wins over the environment, which wins over the defaults.\n"
                    "Each setting's full description: docs/settings.md.")
    serve.set_defaults(func=cmd_serve)

    tokens = commands.add_parser("tokens", help="manage the server's bearer tokens (on the server's machine)")
    tokens_sub = tokens.add_subparsers(dest="tokens_command", required=True)
    create = tokens_sub.add_parser("create", help="make a token, print it once, append its hash to the file")
    create.add_argument("name", help="the caller's name (appears in logs and metrics)")
    create.add_argument("--scopes", required=True, help="comma-separated: evaluate, train, admin")
    create.add_argument("--file", help="the tokens file [env LOSSD_TOKENS_FILE]")
    create.add_argument("--rate", type=float, metavar="ELEMENTS_PER_S",
                        help="most tensor elements per second this caller may evaluate (default: no limit)")
    create.add_argument("--max-jobs", type=int, metavar="N",
                        help="most training jobs this caller may have queued or running (default: no limit)")
    create.add_argument("--max-upload-bytes", type=int, metavar="BYTES",
                        help="most bytes of datasets this caller may store (default: no limit)")
    create.set_defaults(func=cmd_tokens_create)
    listing = tokens_sub.add_parser("list", help="show each token's name, id, scopes and limits (never a secret)")
    listing.add_argument("--file", help="the tokens file [env LOSSD_TOKENS_FILE]")
    listing.set_defaults(func=cmd_tokens_list)
    revoke = tokens_sub.add_parser("revoke", help="remove every token of NAME; a running server refuses them "
                                                  "within a second")
    revoke.add_argument("name", help="the caller's name, as `lossd tokens list` shows it")
    revoke.add_argument("--file", help="the tokens file [env LOSSD_TOKENS_FILE]")
    revoke.set_defaults(func=cmd_tokens_revoke)

    auth = commands.add_parser("metrics-auth", help="manage the users of /metrics basic auth (on the server's machine)")
    auth_sub = auth.add_subparsers(dest="metrics_auth_command", required=True)
    create = auth_sub.add_parser("create", help="make a user with a random password, print the password once, "
                                                "append its hash to the file")
    create.add_argument("name", help="the user name the scraper sends (e.g. prometheus)")
    create.add_argument("--file", help="the basic-auth file [env LOSSD_METRICS_BASIC_AUTH_FILE]")
    create.set_defaults(func=cmd_metrics_auth_create)

    secrets = commands.add_parser("secrets", help="make a deployment's secrets (on the server's machine)")
    secrets_sub = secrets.add_subparsers(dest="secrets_command", required=True)
    init = secrets_sub.add_parser(
        "init", help="make FOLDER (mode 700) with a CA, the server's certificate and key, the metrics user and "
                     "its password, and an empty tokens file, as deploy/compose.yaml mounts them")
    init.add_argument("folder", metavar="FOLDER", help="the secrets folder, e.g. deploy/secrets")
    init.add_argument("--host", action="append", metavar="NAME",
                      help="a DNS name or IP address clients use to reach the server (repeatable); "
                           "the certificate always holds lossd and localhost")
    init.set_defaults(func=cmd_secrets_init)
