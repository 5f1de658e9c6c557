"""The ``lossd`` command line.

The client commands (``losses``, ``eval``, ``health``, ``jobs``, ``monitors``, ...) live
here and only talk to a server. The server's own commands (``serve``,
``tokens``, ``metrics-auth``, ``secrets``) live in the server package and
join through the ``lossd.commands`` entry point (``lossd_server.cli``), so
this module imports nothing from the server.
"""

from __future__ import annotations

import os

# gRPC's C core reads GRPC_VERBOSITY once, when grpc is imported, and would
# print its own lines (a failed TLS handshake, a refused connection) on the
# user's terminal, where the command's one error line already says what
# went wrong. So it is set before anything below imports grpc (``import
# lossd`` does not); a value the user set wins.
os.environ.setdefault("GRPC_VERBOSITY", "NONE")

import argparse  # noqa: E402
import copy  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
from typing import Any, Callable, Optional, Sequence  # noqa: E402

import numpy as np  # noqa: E402

import lossd  # noqa: E402
from lossd import wire  # noqa: E402
from lossd._errors import unavailable_hint  # noqa: E402

ADDRESS_ENV = "LOSSD_ADDRESS"
# The client's TLS files: the flag, else this variable (as the server's
# LOSSD_TLS_* name its own certificate and key).
TLS_FLAGS = {"tls_ca": "LOSSD_TLS_CA", "tls_cert": "LOSSD_TLS_CERT", "tls_key": "LOSSD_TLS_KEY"}
# LOSSD_* variables the client commands read: not server settings, but no
# mistake in a shell that runs both.
# Where the client flags given before the command land (``_take_global_flags``).
GLOBAL_PREFIX = "before_command_"
CLIENT_ENV = frozenset({ADDRESS_ENV, "LOSSD_TOKEN", *TLS_FLAGS.values()})


def _address_default() -> str:
    return os.environ.get(ADDRESS_ENV, "localhost:50051")


def _parse_value(text: str) -> Any:
    """``k=v`` values: JSON where it parses (2.0, true, null, [1,2]), else the string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


class UsageError(ValueError):
    """A flag's value the command cannot use (malformed, or a file it cannot
    read), said as "Expected ... Received ...". ``main`` prints it after
    ``error:`` and exits 2, the status argparse gives its own usage errors."""


def parse_pairs(pairs: Optional[Sequence[str]], flag: str = "--param") -> dict[str, Any]:
    """``["k=v", ...]`` from a repeatable flag -> ``{k: v}`` with JSON-parsed values.

    Raises UsageError for a pair without ``=`` or without a key."""
    out = {}
    for pair in pairs or ():
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"{flag} expects KEY=VALUE. Expected a key, '=' and a value (JSON, else a string). "
                             f"Received: {pair!r}")
        out[key] = _parse_value(value)
    return out


def load_npy(flag: str, path: str) -> np.ndarray:
    """The one array in the ``.npy`` file ``path`` that ``flag`` named.

    Raises UsageError, with what was expected and what was received, for a
    file that is missing, a directory, or not one ``.npy`` array."""
    if not os.path.isfile(path):
        raise UsageError(f"{flag}: expected an existing .npy file. Received: {path!r} "
                         f"({'a directory' if os.path.isdir(path) else 'no such file'})")
    try:
        array = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:  # pickled, truncated or other bytes
        raise UsageError(f"{flag}: expected a .npy file (numpy.save). Received: {path!r}, "
                         f"which numpy cannot read as one ({exc})") from None
    if not isinstance(array, np.ndarray):  # an .npz archive of several arrays
        array.close()
        raise UsageError(f"{flag}: expected a .npy file of one array. Received: {path!r}, "
                         "an .npz archive; save each array with numpy.save")
    return array


# -- parsers -----------------------------------------------------------------

ENTRY_POINT_GROUP = "lossd.commands"
"""Entry points of this group add commands to ``lossd``: each names a
callable that takes the sub-command action of the ``lossd`` parser (its
``add_parser`` makes a LazyParser, so it takes ``before_parse=``). The
server's commands come this way (``lossd_server.cli:register``)."""
SERVER_COMMANDS = ("serve", "tokens", "metrics-auth", "secrets")
SERVER_HINT = 'the server\'s commands ({}) come with the server: pip install "lossd[server]"'


class LazyParser(argparse.ArgumentParser):
    """An ArgumentParser that can fill itself in only when it is used:
    ``before_parse(parser)`` runs once, the first time the parser parses
    (its command was typed). ``lossd serve``'s flags come from the server's
    Settings, whose import (pydantic, the server package) would otherwise
    slow every other command and ``lossd --help``."""

    def __init__(self, *args, before_parse: Optional[Callable[[argparse.ArgumentParser], None]] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._before_parse = before_parse

    def parse_known_args(self, args=None, namespace=None):
        if self._before_parse is not None:
            fill, self._before_parse = self._before_parse, None
            fill(self)
        return super().parse_known_args(args, namespace)


# -- client commands --------------------------------------------------------

def client_tls(args: argparse.Namespace) -> "lossd.TLS | None":
    """The TLS the flags (or LOSSD_TLS_CA/CERT/KEY) ask for; None for plain text."""
    files = {name: getattr(args, name, None) for name in TLS_FLAGS}
    if not (getattr(args, "tls", False) or any(files.values())):
        return None
    return lossd.TLS(ca=files["tls_ca"], cert=files["tls_cert"], key=files["tls_key"])


def client_from(args: argparse.Namespace) -> "lossd.Client":
    """The client a command's flags describe: address, deadline and TLS."""
    return lossd.Client(args.address, timeout=args.timeout, tls=client_tls(args),
                        token=getattr(args, "token", None) or os.environ.get("LOSSD_TOKEN") or None)


def cmd_losses_register(args: argparse.Namespace) -> int:
    params = parse_pairs(args.param)
    with client_from(args) as client:
        info = client.register_loss(args.name, args.expression, params=params,
                                    inputs=args.input, doc=args.doc, replace=args.replace)
    print(f"registered {info.name}({', '.join(info.inputs)}): {info.expression}")
    return 0


def cmd_losses_delete(args: argparse.Namespace) -> int:
    with client_from(args) as client:
        client.delete_loss(args.name)
    print(f"deleted {args.name}")
    return 0


def cmd_losses(args: argparse.Namespace) -> int:
    with client_from(args) as client:
        losses = client.losses()
    if args.json:
        print(json.dumps([{"name": l.name, "aliases": l.aliases, "doc": l.doc, "source": l.source,
                           "parameters": [vars(p) for p in l.parameters]} for l in losses], indent=2))
        return 0
    width = max(len(l.name) for l in losses)
    for info in losses:
        params = ", ".join(f"{p.name}={json.dumps(p.default)}" for p in info.parameters)
        aliases = f" (aliases: {', '.join(a for a in info.aliases if a.islower())})" \
            if any(a.islower() for a in info.aliases) else ""
        print(f"{info.name:<{width}}  {params or '-'}{aliases}")
        print(f"{'':<{width}}  {info.doc}")
    return 0


# The request's own tensors, each with a flag of its own rather than --tensor.
_OWN_TENSOR_FLAGS = {"y_true": "--y-true", "y_pred": "--y-pred", "sample_weight": "--sample-weight"}


def load_tensors(pairs: Optional[Sequence[str]]) -> dict[str, np.ndarray]:
    """``["NAME=FILE.npy", ...]`` from the repeatable ``--tensor`` -> ``{NAME: array}``.

    Raises UsageError, with what was expected and what was received, for a
    pair without ``=`` or a name, a name given twice or that has its own
    flag, and a file that is missing or not one ``.npy`` array."""
    tensors: dict[str, np.ndarray] = {}
    for pair in pairs or ():
        name, sep, path = pair.partition("=")
        if not sep or not name or not path:
            raise UsageError(f"--tensor expects NAME=FILE.npy. Received: {pair!r}")
        if name in _OWN_TENSOR_FLAGS:
            raise UsageError(f"--tensor {name}: {name} has its own flag. Expected {_OWN_TENSOR_FLAGS[name]} "
                             f"{path}. Received: --tensor {pair}")
        if name in tensors:
            raise UsageError(f"--tensor {name}: given twice. Expected each name once. Received: --tensor {pair}")
        tensors[name] = load_npy(f"--tensor {name}", path)
    return tensors


def cmd_eval(args: argparse.Namespace) -> int:
    # Every flag is read before the server is called: a typo costs no round trip.
    tensors = load_tensors(args.tensor)
    y_true = load_npy("--y-true", args.y_true)
    y_pred = load_npy("--y-pred", args.y_pred)
    sample_weight = load_npy("--sample-weight", args.sample_weight) if args.sample_weight else None
    params = parse_pairs(args.param)
    loss: Any = {"expression": args.loss[len("expr:"):]} if args.loss.startswith("expr:") else args.loss
    with client_from(args) as client:
        result = client.evaluate(loss, y_true, y_pred, params=params, sample_weight=sample_weight,
                                 reduction=args.reduction, gradient=bool(args.gradient_out), tensors=tensors)
    if args.gradient_out:
        np.save(args.gradient_out, result.gradient)
    if args.outputs_dir and not result.outputs:
        print(f"note: {args.loss} returns no outputs; nothing saved in {args.outputs_dir}", file=sys.stderr)
    elif args.outputs_dir:
        os.makedirs(args.outputs_dir, exist_ok=True)
        for name, value in result.outputs.items():
            if not name.isidentifier():  # the server names the file: never a path out of DIR
                print(f"error: the server returned an output named {name!r}. Expected an identifier, to save "
                      f"it as DIR/NAME.npy; not saved", file=sys.stderr)
                return 1
            np.save(os.path.join(args.outputs_dir, f"{name}.npy"), value)
    if result.loss.ndim == 0:
        print(f"{result.loss.item():.8g}")
    else:
        print(np.array2string(result.loss, threshold=20))
    for label, value in result.terms.items():
        print(f"  {label}: {np.asarray(value).item() if np.asarray(value).ndim == 0 else value}")
    for name, value in result.outputs.items():  # a stateful loss's next state, e.g. matrix_crossentropy's matrix
        prefix = f"  output {name}: "
        print(prefix + np.array2string(value, threshold=20, prefix=prefix))
    if result.non_finite:
        print("warning: inputs or result hold NaN or Inf", file=sys.stderr)
    return 0


def cmd_health(args: argparse.Namespace) -> int:
    """Exit 0 when the server reports SERVING (for container health checks)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    tls = client_tls(args)
    channel = grpc.secure_channel(args.address, tls.credentials()) if tls else grpc.insecure_channel(args.address)
    with channel:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout or 5.0)
        except grpc.RpcError as error:
            details = error.details() or ""
            if error.code() == grpc.StatusCode.UNAVAILABLE:
                details = unavailable_hint(args.address, details)
            print(f"unhealthy: {error.code().name}: {details}", file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    print(status)
    return 0 if status == "SERVING" else 1


def client_flags() -> argparse.ArgumentParser:
    """``--address`` and ``--timeout``, as a parent parser for every client
    command and each of its sub-commands, so they may follow either
    (``lossd losses --address A register ...`` and ``lossd losses register ...
    --address A`` alike). SUPPRESS keeps an outer value when an inner parser
    does not see the flag; ``main`` fills in the defaults."""
    flags = argparse.ArgumentParser(add_help=False)
    flags.add_argument("--address", default=argparse.SUPPRESS,
                       help=f"server host:port [env {ADDRESS_ENV}; default localhost:50051]")
    flags.add_argument("--timeout", type=float, default=argparse.SUPPRESS, help="deadline in seconds [none]")
    flags.add_argument("--token", default=argparse.SUPPRESS, help="bearer token [env LOSSD_TOKEN]")
    flags.add_argument("--tls", action="store_true", default=argparse.SUPPRESS,
                       help="use TLS, trusting the system's roots (implied by --tls-ca/--tls-cert)")
    for name, env in TLS_FLAGS.items():
        what = {"tls_ca": "PEM CA certificates that signed the server's certificate",
                "tls_cert": "PEM client certificate, for a server that asks for one (mTLS)",
                "tls_key": "PEM private key of --tls-cert"}[name]
        flags.add_argument(f"--{name.replace('_', '-')}", default=argparse.SUPPRESS, metavar="FILE",
                           help=f"{what} [env {env}]")
    return flags


def add_entry_point_commands(parser: argparse.ArgumentParser) -> None:
    """Runs every ``lossd.commands`` entry point on the commands of
    ``parser`` (``build_parser``'s). One that cannot be loaded (its package
    gone, or without its dependencies) adds nothing and says so on stderr,
    so the client commands still work. Without the server's commands,
    ``--help`` says how to get them."""
    from importlib.metadata import entry_points  # about 20 ms: only when a command may come from one

    sub = parser.get_default("commands")
    for point in entry_points(group=ENTRY_POINT_GROUP):
        try:
            point.load()(sub)
        except ImportError as exc:
            print(f"note: the command(s) of {point.value} are missing: {exc}", file=sys.stderr)
    missing = [name for name in SERVER_COMMANDS if name not in sub.choices]
    if missing:
        parser.epilog = SERVER_HINT.format(", ".join(missing))


def build_parser(with_plugins: bool = True) -> argparse.ArgumentParser:
    """The ``lossd`` parser: the client commands, and with ``with_plugins``
    those of the ``lossd.commands`` entry points (the server's)."""
    parser = LazyParser(prog="lossd", description="Evaluate Keras losses and train models over gRPC.")
    parser.add_argument("--version", action="version", version=f"lossd {lossd.__version__}")
    # The client flags before the command too (lossd --address H health), in
    # dests of their own: ``main`` hands them to a client command, and refuses
    # them for the server's commands, whose own flags share some names (--tls-cert).
    first = parser.add_argument_group("client flags, also accepted after the command")
    for action in client_flags()._actions:
        action = copy.copy(action)
        if action.nargs != 0 and action.metavar is None:
            action.metavar = action.dest.upper()  # ADDRESS, not the dest below
        first._add_action(action).dest = GLOBAL_PREFIX + action.dest
    sub = parser.add_subparsers(dest="command", required=True, parser_class=LazyParser)
    parser.set_defaults(commands=sub)  # add_entry_point_commands adds to it

    def client_parser(name: str, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, parents=[client_flags()])
        p.set_defaults(client_command=True)
        return p

    p = client_parser("losses", "list the losses the server evaluates (or register/delete one)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_losses)
    losses_sub = p.add_subparsers(dest="losses_command")
    r = losses_sub.add_parser("register", parents=[client_flags()], help="register a named expression loss")
    r.add_argument("name", help="a lowercase identifier")
    r.add_argument("expression", help="the loss in lossd's expression language")
    r.add_argument("--param", action="append", metavar="KEY=DEFAULT", help="parameter and default (repeatable)")
    r.add_argument("--input", action="append", metavar="TENSOR", help="input tensor, in order (default y_true y_pred)")
    r.add_argument("--doc", default="", help="one-line description")
    r.add_argument("--replace", action="store_true", help="overwrite a registered loss of the same name")
    r.set_defaults(func=cmd_losses_register)
    d = losses_sub.add_parser("delete", parents=[client_flags()], help="delete a registered expression loss")
    d.add_argument("name")
    d.set_defaults(func=cmd_losses_delete)

    p = client_parser("eval", "evaluate a loss on .npy files")
    p.add_argument("loss", help="a loss name (huber, mse, ...) or expr:EXPRESSION")
    p.add_argument("--y-true", required=True, help=".npy file of targets")
    p.add_argument("--y-pred", required=True, help=".npy file of predictions")
    p.add_argument("--sample-weight", help=".npy file of sample weights")
    p.add_argument("--param", action="append", metavar="KEY=VALUE", help="loss parameter (repeatable)")
    p.add_argument("--reduction", default=wire.DEFAULT_REDUCTION, choices=wire.REDUCTIONS)
    p.add_argument("--gradient-out", metavar="FILE.npy", help="also compute the gradient and save it here")
    p.add_argument("--tensor", action="append", metavar="NAME=FILE.npy",
                   help="an extra named tensor, for expressions and composite terms that read NAME, or a "
                        "stateful loss's state such as matrix_crossentropy's matrix (repeatable)")
    p.add_argument("--outputs-dir", metavar="DIR",
                   help="save each tensor the loss returns besides its value (outputs, e.g. the updated "
                        "matrix) as DIR/NAME.npy")
    p.set_defaults(func=cmd_eval)

    p = client_parser("health", "check the server's gRPC health (exit 0 when SERVING)")
    p.add_argument("--service", default="", help="service name ('' for the whole server)")
    p.set_defaults(func=cmd_health)
    from lossd import _cli_training

    _cli_training.register(sub, client_parser)
    from lossd import _cli_monitors

    _cli_monitors.register(sub, client_parser)
    if with_plugins:
        add_entry_point_commands(parser)
    return parser


def _take_global_flags(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Moves the client flags given before the command into ``args`` where the
    command's own (given after it) did not set them; a parser error for a
    command that is not a client command."""
    given = {name[len(GLOBAL_PREFIX):]: value for name, value in vars(args).items() if name.startswith(GLOBAL_PREFIX)}
    for name in given:
        delattr(args, GLOBAL_PREFIX + name)
    if given and not getattr(args, "client_command", False):
        flags = ", ".join(f"--{name.replace('_', '-')}" for name in given)
        parser.error(f"{flags}: a client flag. Expected it with a command that calls a server (losses, eval, "
                     f"health, jobs, datasets, ...). Received: it before `{args.command}`")
    for name, value in given.items():
        if not hasattr(args, name):
            setattr(args, name, value)


def command_of(argv: Sequence[str]) -> Optional[str]:
    """The command word of ``argv``: its first argument that is neither a
    flag before the command nor such a flag's value."""
    valued = {option for action in client_flags()._actions if action.nargs != 0 for option in action.option_strings}
    words = iter(argv)
    for word in words:
        if word in valued:
            next(words, None)
        elif not word.startswith("-"):
            return word
    return None


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(with_plugins=False)
    if command_of(argv) not in parser.get_default("commands").choices:
        # Not a client command: perhaps an entry point's. Client commands
        # skip reading the entry points (importlib.metadata, ~20-40 ms).
        add_entry_point_commands(parser)
        if command_of(argv) in SERVER_COMMANDS and command_of(argv) not in parser.get_default("commands").choices:
            print(f"error: `lossd {command_of(argv)}`: {SERVER_HINT.format(', '.join(SERVER_COMMANDS))}",
                  file=sys.stderr)
            return 2
    args = parser.parse_args(argv)
    del args.commands
    _take_global_flags(parser, args)
    if getattr(args, "client_command", False):
        if getattr(args, "address", None) is None:
            args.address = _address_default()
        if not hasattr(args, "timeout"):
            args.timeout = None
        for name, env in TLS_FLAGS.items():
            if getattr(args, name, None) is None:
                setattr(args, name, os.environ.get(env) or None)
    try:
        code = args.func(args)
        sys.stdout.flush()  # a closed pipe shows here, not at exit
        return code
    except BrokenPipeError:
        # The reader went away (`lossd losses | head`): stop quietly, as
        # Unix tools do, with the status a SIGPIPE gives (128 + 13).
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 141
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except lossd.LossdError as error:
        print(f"error: {error.code.name}{f' {error.reason}' if error.reason else ''}: {error.message}", file=sys.stderr)
        return 1
    except FileNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
