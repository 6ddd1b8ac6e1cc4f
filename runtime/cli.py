"""The ``cytoedge`` command: one sub-command per module listed in COMMANDS.

Each command module defines ``add_parser(subparsers)`` (which sets ``func``) and keeps its own
imports lazy, so ``cytoedge --help`` starts fast and a missing optional extra only affects the
command that needs it.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

COMMANDS = [
    "cytoedge.runtime.commands.classify",
    "cytoedge.runtime.commands.calibrate",
    "cytoedge.runtime.commands.evaluate",
    "cytoedge.runtime.commands.compare",
    "cytoedge.runtime.commands.adapt",
    "cytoedge.runtime.commands.serve",
    "cytoedge.runtime.commands.submit",
    "cytoedge.runtime.commands.watch",
    "cytoedge.runtime.commands.score",
    "cytoedge.runtime.commands.monitor",
    "cytoedge.runtime.commands.synth",
    "cytoedge.runtime.commands.demo",
    "cytoedge.runtime.commands.export",
    "cytoedge.runtime.commands.quantize",
    "cytoedge.runtime.commands.build_engine",
    "cytoedge.runtime.commands.doctor",
    "cytoedge.runtime.commands.bench",
]


def build_parser() -> argparse.ArgumentParser:
    from cytoedge.runtime import __version__

    parser = argparse.ArgumentParser(prog="cytoedge", description="Blood-cell morphology by diffusion likelihoods.")
    parser.add_argument("--version", action="version", version=f"cytoedge {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(name).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)]
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    from cytoedge.runtime.errors import CytoedgeError

    try:
        return int(args.func(args) or 0)
    except CytoedgeError as e:
        print(f"cytoedge {args.command}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
