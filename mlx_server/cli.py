"""mlx-server command line: serve | check-config | import (pull, list, ps, run and launchd come with operations)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Optional, Sequence

from mlx_server.config import ConfigError, default_config_path, load_config


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from mlx_server.api.app import create_app

    config = load_config(args.config, overrides={"host": args.host, "port": args.port})
    app = create_app(config)
    s = config.server
    logging.getLogger("mlx_server").info("config %s; listening on %s:%d; memory budget %.1f GB",
                                         config.path, s.host, s.port, s.memory_budget / 1e9)
    uvicorn.run(app, host=s.host, port=s.port, log_level=args.log_level.lower(), access_log=False)
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    config = load_config(args.path or args.config)
    print(f"{config.path}: OK ({len(config.models)} models)")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from mlx_server.engine.gguf_import import import_gguf

    cache = Path(args.cache_dir).expanduser() if args.cache_dir else None
    if cache is None:
        try:
            cache = load_config(args.config).server.cache_dir
        except ConfigError:
            cache = Path.home() / ".cache" / "mlx-server"
    out = import_gguf(Path(args.file).expanduser().resolve(), cache)
    print(out)
    if args.name:
        print(f"add to models.yaml:\n  {args.name}:\n    source: {args.file}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mlx-server", description=__doc__)
    parser.add_argument("--config", type=Path, default=None,
                        help="models.yaml (default: $MLX_SERVER_CONFIG or ./models.yaml)")
    parser.add_argument("--log-level", default="info")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the server")
    serve.add_argument("--host", default=None)
    serve.add_argument("--port", type=int, default=None)
    serve.set_defaults(func=cmd_serve)

    check = sub.add_parser("check-config", help="validate models.yaml and exit (2 on error)")
    check.add_argument("path", nargs="?", type=Path, default=None)
    check.set_defaults(func=cmd_check_config)

    imp = sub.add_parser("import", help="convert a llama-architecture GGUF file into an MLX model dir")
    imp.add_argument("file")
    imp.add_argument("--name", default=None)
    imp.add_argument("--cache-dir", default=None)
    imp.set_defaults(func=cmd_import)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.log_level)
    if args.config is None:
        args.config = default_config_path()
    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
