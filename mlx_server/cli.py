"""mlx-server command line.

Server:     serve | check-config | import | launchd install|uninstall|status
Diagnose:   doctor [--json] [--load]   (why is this machine not serving what models.yaml says?)
Models:     pull NAME | preload [NAMES...] (download what is missing, then warm the running server)
Ollama:     import ollama:NAME | ollama list   (serve what the local Ollama store already holds)
Client:     list | ps | run NAME [PROMPT]   (talk to a running server, like the ollama CLI)
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

from mlx_server.config.load import Config, ConfigError, default_config_path
from mlx_server.models.config import load_config


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # httpx logs every request at INFO; the client commands' output is their tables, not a request log.
    logging.getLogger("httpx").setLevel(logging.WARNING)


def cmd_serve(args: argparse.Namespace) -> int:
    from mlx_server.serve import run, setup_logging

    overrides = {"host": args.host, "port": args.port, "log_format": getattr(args, "log_format", None)}
    config = load_config(args.config, overrides=overrides)
    setup_logging(args.log_level, config.server.log_format)
    if getattr(args, "distributed", False):
        from mlx_server.serve import run_distributed

        return run_distributed(config, args.log_level, args.backend, args.rank_timeout)
    return run(config, args.log_level)


def cmd_check_config(args: argparse.Namespace) -> int:
    from mlx_server.models.info import InfoCache, context_note
    from mlx_server.models.sources import locate

    config = load_config(args.path or args.config)
    print(f"{config.path}: OK ({len(config.models)} models)")
    infos = InfoCache()
    for name, model in config.models.items():
        if model.context_length is None or model.source.strip().endswith(".zip"):
            continue  # nothing to compare, or a zip this check must not extract
        info = infos.describe(locate(model, config.path.parent if config.path else None, config.server.cache_dir))
        note = context_note(name, model.context_length, info.context_length if info is not None else 0)
        if note is not None:
            print(f"warning: {note}")
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from mlx_server.ops.doctor.checks import run

    return run(args.config, as_json=args.json, load=args.load, out=sys.stdout)


def cmd_import(args: argparse.Namespace) -> int:
    from mlx_server.ops.ollama_cli import run_import

    cache = Path(args.cache_dir).expanduser() if args.cache_dir else None
    if cache is None:
        try:
            cache = load_config(args.config).server.cache_dir
        except ConfigError:
            cache = Path.home() / ".cache" / "mlx-server"
    return run_import(args.file, cache, args.name)


def cmd_ollama(args: argparse.Namespace) -> int:
    from mlx_server.ops.ollama_cli import run_list

    return run_list(Path(args.store).expanduser() if args.store else None)


# ---- operations -------------------------------------------------------------------------------------------------


def _client_config(args: argparse.Namespace) -> Optional[Config]:
    """The config, if there is one: client commands work without it, unless it was named and is broken."""
    try:
        return load_config(args.config)
    except ConfigError:
        if args.config_explicit:
            raise
        return None


def _url(args: argparse.Namespace, config: Optional[Config]) -> str:
    from mlx_server.ops.client import server_url

    return server_url(getattr(args, "server", None), config)


def _key(config: Optional[Config]) -> Optional[str]:
    from mlx_server.ops.client import api_key

    return api_key(config)


def _launchd_flag_mismatch(args: argparse.Namespace) -> Optional[str]:
    """The distributed flags only make sense together; a half-given set is a typo, not a request for a default."""
    if args.distributed and args.hostfile is None:
        return "--distributed needs --hostfile FILE (the mlx.launch hostfile)"
    if not args.distributed and args.hostfile is not None:
        return "--hostfile needs --distributed"
    if not args.distributed and args.backend is not None:
        return "--backend needs --distributed"
    return None


def cmd_launchd(args: argparse.Namespace) -> int:
    from mlx_server.ops.launchd import TEMPLATE, Agent, Group, Host, Launchctl

    mismatch = _launchd_flag_mismatch(args)
    if mismatch:
        print(f"launchd: {mismatch}", file=sys.stderr)
        return 2
    config_path = Path(args.config).expanduser().resolve()
    group = None
    if args.action == "install":
        load_config(config_path)  # a broken models.yaml would make the agent crash-loop; refuse it now
        if args.distributed:  # so would a missing or malformed hostfile
            group = Group.load(args.hostfile, args.backend or "ring")
    agent = Agent(
        label=args.label,
        config=config_path,
        host=Host.current(),
        template=Path(args.template).expanduser().resolve() if args.template else TEMPLATE,
        group=group,
    )
    if group is not None and not agent.launcher.is_file():
        raise ConfigError(
            agent.launcher,
            "",
            "not found: the distributed agent starts the group with it (install mlx into this environment)",
        )
    ctl = Launchctl(agent)
    if args.dry_run:
        return ctl.dry_run(args.action, sys.stdout)
    if args.action == "install":
        return ctl.install()
    if args.action == "uninstall":
        return ctl.uninstall()
    config = _client_config(args)
    return ctl.status(_url(args, config), _key(config), sys.stdout)


def cmd_pull(args: argparse.Namespace) -> int:
    from mlx_server.ops.client import human_size
    from mlx_server.ops.pull import ensure_local

    config = load_config(args.config)
    name = config.resolve(args.name)
    if name is None:
        print(f'Error: model "{args.name}" not found in {config.path}', file=sys.stderr)
        return 1
    result = ensure_local(
        config.models[name], config.path.parent if config.path else None, update=True, cache_dir=config.server.cache_dir
    )
    if not result.ok:
        print(f"Error: pulling {name} failed: {result.error}", file=sys.stderr)
        return 1
    print(f"{name}: {result.path} ({human_size(result.size)}, {'downloaded' if result.downloaded else 'up to date'})")
    print("success")
    return 0


def cmd_preload(args: argparse.Namespace) -> int:
    from mlx_server.ops.preload import preload

    config = load_config(args.config)
    return preload(
        config,
        args.names,
        preload_only=args.preload_only,
        url=_url(args, config),
        key=_key(config),
        do_warm=not args.no_warm,
        out=sys.stdout,
        err=sys.stderr,
    )


def cmd_list(args: argparse.Namespace) -> int:
    from mlx_server.ops.client import cmd_list as run

    config = _client_config(args)
    return run(_url(args, config), config, sys.stdout, sys.stderr, _key(config))


def cmd_ps(args: argparse.Namespace) -> int:
    from mlx_server.ops.client import cmd_ps as run

    config = _client_config(args)
    return run(_url(args, config), sys.stdout, _key(config))


def cmd_run(args: argparse.Namespace) -> int:
    from mlx_server.ops.client import cmd_run as run

    config = _client_config(args)
    prompt = " ".join(args.prompt) if args.prompt else None
    return run(_url(args, config), args.model, prompt, key=_key(config))


# ---- parser -----------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mlx-server", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--config", type=Path, default=None, help="models.yaml (default: $MLX_SERVER_CONFIG or ./models.yaml)"
    )
    parser.add_argument("--log-level", default="info")
    # Every subcommand also takes --config (`mlx-server serve --config X`, what the launchd plist runs).
    # SUPPRESS keeps an absent sub-option from overwriting a top-level --config.
    config_opt = argparse.ArgumentParser(add_help=False)
    config_opt.add_argument("--config", type=Path, default=argparse.SUPPRESS, help="models.yaml")
    server_opt = argparse.ArgumentParser(add_help=False)
    server_opt.add_argument(
        "--server", default=None, help="server URL (default: $MLX_SERVER_URL, else the config's host:port)"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", parents=[config_opt], help="run the server")
    serve.add_argument("--host", default=None)
    serve.add_argument("--port", type=int, default=None)
    serve.add_argument("--log-format", choices=["text", "json"], default=None, help="json: one object per line")
    serve.add_argument(
        "--distributed",
        action="store_true",
        help="one rank of a group started by mlx.launch: rank 0 serves HTTP, the others follow it",
    )
    serve.add_argument("--backend", default="any", help="distributed backend: any | ring | jaccl | mpi")
    serve.add_argument(
        "--rank-timeout",
        type=float,
        default=20.0,
        help="seconds a rank may wait on the others before the group counts as broken",
    )
    serve.set_defaults(func=cmd_serve)

    check = sub.add_parser("check-config", parents=[config_opt], help="validate models.yaml and exit (2 on error)")
    check.add_argument("path", nargs="?", type=Path, default=None)
    check.set_defaults(func=cmd_check_config)

    doctor = sub.add_parser(
        "doctor",
        parents=[config_opt],
        help="check Python, MLX, memory, models.yaml, the models, the port, launchd and the "
        "fallback; exit 1 when something stops serving",
    )
    doctor.add_argument("--json", action="store_true", help="one JSON object (docs/doctor.schema.json)")
    doctor.add_argument("--load", action="store_true", help="also load each model in turn (in a child process)")
    doctor.set_defaults(func=cmd_doctor)

    imp = sub.add_parser(
        "import",
        parents=[config_opt],
        help="convert a GGUF file or an Ollama model (ollama:NAME[:TAG]) into an MLX model dir",
    )
    imp.add_argument("file", help="FILE.gguf or ollama:NAME[:TAG]")
    imp.add_argument("--name", default=None)
    imp.add_argument("--cache-dir", default=None)
    imp.set_defaults(func=cmd_import)

    oll = sub.add_parser("ollama", help="the local Ollama store: `list` shows what it holds and what can be served")
    oll.add_argument("action", choices=["list"])
    oll.add_argument("--store", default=None, help="the store (default: $OLLAMA_MODELS or ~/.ollama/models)")
    oll.set_defaults(func=cmd_ollama)

    launchd = sub.add_parser(
        "launchd", parents=[config_opt, server_opt], help="run the server as a launchd agent (macOS)"
    )
    launchd.add_argument("action", choices=["install", "uninstall", "status"])
    launchd.add_argument("--label", default="com.mlx-server")
    launchd.add_argument("--template", default=None, help="plist template (default: launchd/ in the checkout)")
    launchd.add_argument("--dry-run", action="store_true", help="print the plist and commands, change nothing")
    launchd.add_argument(
        "--distributed",
        action="store_true",
        help="install: start a distributed group with mlx.launch (rank 0 serves HTTP)",
    )
    launchd.add_argument("--hostfile", type=Path, default=None, help="the mlx.launch hostfile (with --distributed)")
    launchd.add_argument(
        "--backend", choices=["ring", "jaccl"], default=None, help="distributed backend (default: ring)"
    )
    launchd.set_defaults(func=cmd_launchd)

    pull = sub.add_parser("pull", parents=[config_opt], help="download a configured model's weights")
    pull.add_argument("name")
    pull.set_defaults(func=cmd_pull)

    pre = sub.add_parser(
        "preload",
        parents=[config_opt, server_opt],
        help="download missing models, then load them into the running server",
    )
    pre.add_argument("names", nargs="*", help="models to preload (default: all configured)")
    pre.add_argument("--preload-only", action="store_true", help="only models with preload: true")
    pre.add_argument("--no-warm", action="store_true", help="only download and verify; do not load")
    pre.set_defaults(func=cmd_preload)

    lst = sub.add_parser("list", aliases=["ls"], parents=[config_opt, server_opt], help="list models on disk")
    lst.set_defaults(func=cmd_list)

    ps = sub.add_parser("ps", parents=[config_opt, server_opt], help="list loaded models")
    ps.set_defaults(func=cmd_ps)

    run = sub.add_parser(
        "run",
        parents=[config_opt, server_opt],
        help="chat with a model (one-shot with PROMPT or piped stdin, else interactive)",
    )
    run.add_argument("model")
    run.add_argument("prompt", nargs="*")
    run.set_defaults(func=cmd_run)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.log_level)
    args.config_explicit = args.config is not None or bool(os.environ.get("MLX_SERVER_CONFIG"))
    if args.config is None:
        args.config = default_config_path()
    from mlx_server.ops.client import ClientError  # light: httpx only

    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    except ClientError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
