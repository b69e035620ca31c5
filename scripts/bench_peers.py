#!/usr/bin/env python3
"""Our server against the MLX peers (issue 26) — so far only the peers' venvs: scripts/peers.py builds them.

    .venv/bin/python scripts/bench_peers.py --build-only              # build (or reuse) every peer's venv, say what
    .venv/bin/python scripts/bench_peers.py --build-only --smoke      # ... and start each on a tiny model, one stream
    .venv/bin/python scripts/bench_peers.py --build-only --peers vllm-mlx --json peers.json

A peer that cannot be built or started is reported with its error (and the last lines of its log); the exit status
is then 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peers  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--build-only",
        action="store_true",
        help="build the peers' venvs and stop (the benchmark itself is not here yet)",
    )
    ap.add_argument(
        "--smoke", action="store_true", help="with --build-only: start each peer on a tiny model and stream one chat"
    )
    ap.add_argument("--peers", default=",".join(peers.RECIPES), help="comma-separated (default: all)")
    ap.add_argument("--cache", type=Path, default=peers.DEFAULT_CACHE)
    ap.add_argument("--force", action="store_true", help="rebuild the venvs even when their recipes match")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    names = [n for n in args.peers.split(",") if n]
    unknown = [n for n in names if n not in peers.RECIPES]
    if unknown:
        ap.error(f"unknown peer(s) {unknown}; known: {list(peers.RECIPES)}")
    if not args.build_only:
        ap.error("only --build-only is implemented so far")
    results, failed = peers.build_and_smoke(names, cache=args.cache, force=args.force, smoke_test=args.smoke)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    if failed:
        print(f"\n{len(failed)} peer(s) failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
