"""``cytoedge serve``: the scanner-link daemon (ZeroMQ ROUTER, protocol v1: docs/protocol.md).

Loads the model once and scores jobs sent by the scanner software: slide files under the
configured roots, or tiles streamed in-band while the slide is scanned. Every cell is journaled
(SQLite WAL) before it is sent, so nothing is lost across client reconnects or daemon restarts.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import signal
import sys
from pathlib import Path

from cytoedge.runtime.commands.common import (add_model_arguments, add_red_cell_arguments, add_run_log_arguments,
                                              add_scoring_arguments, load_bundle_and_backend, red_cell_stage,
                                              scoring_options)

log = logging.getLogger(__name__)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run the scanner-link daemon", description=__doc__)
    p.add_argument("--config", type=Path, default=None, help="JSON configuration file (flags override it)")
    p.add_argument("--endpoint", default=None, help="tcp://127.0.0.1:PORT (default 5590) or ipc://PATH")
    p.add_argument("--roots", type=Path, nargs="+", default=None, metavar="DIR",
                   help="folders submitted slide paths must lie under")
    p.add_argument("--journal", type=Path, default=None, help="SQLite journal file (default ./cytoedge-journal.sqlite3)")
    p.add_argument("--max-jobs", type=int, default=None, help="unfinished jobs before SUBMIT is answered BUSY")
    p.add_argument("--max-pending-tiles", type=int, default=None, help="unscored in-band tiles before TILE is BUSY")
    p.add_argument("--window", type=int, default=None, help="default CELL credit per job")
    p.add_argument("--stream-idle-s", type=float, default=None,
                   help="a stream with no TILE or END_OF_SLIDE for this long fails and its tiles are freed "
                        "(default 300)")
    p.add_argument("--curve-secret-key", type=Path, default=None, help="server certificate with its secret key")
    p.add_argument("--curve-allowed-keys", type=Path, default=None, help="folder of allowed client public keys")
    p.add_argument("--log-format", choices=("text", "json"), default=None, help="json: one JSON object per log line")
    add_run_log_arguments(p, "one row per scored slide")
    p.add_argument("--include-identifiers", action="store_true", default=None,
                   help="put a DICOM slide's patient, study and specimen identifiers in its SUMMARY (and the "
                        "journal); by default none reaches them (configuration key include_identifiers)")
    add_model_arguments(p)
    add_scoring_arguments(p, scale=False)  # a job's scale comes with its SUBMIT
    add_red_cell_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from cytoedge.runtime.errors import CytoedgeError
    from cytoedge.runtime.service.config import JsonLogFormatter, load_config
    from cytoedge.runtime.service.daemon import Daemon
    from cytoedge.runtime.service.scorer_binding import SlideScorerFactory

    overrides = {"endpoint": args.endpoint, "roots": args.roots, "journal": args.journal, "max_jobs": args.max_jobs,
                 "max_pending_tiles": args.max_pending_tiles, "window": args.window,
                 "stream_idle_s": args.stream_idle_s,
                 "curve_secret_key": args.curve_secret_key, "curve_allowed_keys": args.curve_allowed_keys,
                 "log_format": args.log_format, "run_log": args.run_log,
                 "include_identifiers": args.include_identifiers}
    try:
        config = load_config(args.config, overrides)
    except CytoedgeError as e:
        print(f"cytoedge serve: {e}", file=sys.stderr)
        return 2
    if args.no_run_log:
        config.run_log = None
    root_logger = logging.getLogger()
    root_logger.setLevel(min(root_logger.level, logging.INFO))
    if config.log_format == "json":
        for handler in root_logger.handlers:
            handler.setFormatter(JsonLogFormatter())
    bundle, backend, estimator = load_bundle_and_backend(args)
    # The daemon writes no review page: no cell views are kept (heatmaps still cut the ones they draw on).
    options = dataclasses.replace(scoring_options(args), review_cells=0)
    daemon = Daemon(config, SlideScorerFactory(bundle, backend, estimator, options,
                                               include_identifiers=config.include_identifiers,
                                               red_cells=red_cell_stage(args)))
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: daemon.stop())
    daemon.serve()
    return 0
