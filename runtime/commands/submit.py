"""``cytoedge submit SLIDE... --endpoint E``: score slides on a running ``cytoedge serve``.

Streams each cell to the terminal as the daemon delivers it; with ``--json`` waits for every slide
and prints the same result document as ``cytoedge score --json`` (the local run and the service
agree cell for cell). Paths are sent resolved; they must lie under the daemon's roots. A refused or
failed slide is named with its reason and the others are still collected. Exit code: 0 every slide
scored, 1 some slide refused or failed, 2 the daemon could not be reached or stopped answering.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

from cytoedge.runtime.commands.common import add_um_per_px_argument
from cytoedge.runtime.service.config import DEFAULT_ENDPOINT


def add_client_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--endpoint", default=DEFAULT_ENDPOINT, help=f"daemon endpoint (default {DEFAULT_ENDPOINT})")
    p.add_argument("--server-key", type=Path, default=None, help="CURVE: the server's public certificate")
    p.add_argument("--client-key", type=Path, default=None, help="CURVE: this client's secret certificate")
    p.add_argument("--timeout", type=float, default=600.0,
                   help="seconds without progress (a cell or tile scored, a job's state changing) before giving up; "
                        "the daemon's keep-alives do not count")


def connect(args: argparse.Namespace):
    from cytoedge.runtime.service.client import CurveKeys, ScannerLinkClient

    curve = None
    if args.server_key or args.client_key:
        if not (args.server_key and args.client_key):
            raise SystemExit("cytoedge: --server-key and --client-key go together")
        curve = CurveKeys.from_files(args.server_key, args.client_key)
    return ScannerLinkClient(args.endpoint, curve=curve, timeout_s=args.timeout)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("submit", help="score slides on a running daemon", description=__doc__)
    p.add_argument("slides", nargs="+", type=Path, metavar="SLIDE", help="slide files or field folders")
    add_um_per_px_argument(p, "scale of the slides (overrides the files)")
    p.add_argument("--json", action="store_true", help="print one result document (as `cytoedge score --json`)")
    add_client_arguments(p)
    p.add_argument("--connect-timeout", type=float, default=5.0,
                   help="seconds to wait for the daemon's first answer (HELLO) before giving up (default 5)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from cytoedge.runtime.errors import CytoedgeError
    from cytoedge.runtime.service.client import ServiceError
    from cytoedge.runtime.result_document import build_slides_document, slide_entry
    from cytoedge.runtime.sources import source_sha256

    plan: list[tuple[str, str | None, str | None]] = []  # per slide: source, job id, why it was refused
    try:
        with connect(args) as client:
            model = dict(client.hello(timeout_s=args.connect_timeout)["model"])
            for slide in args.slides:
                try:
                    source = str(slide.resolve())
                except (OSError, RuntimeError) as e:  # a symlink loop, ...
                    plan.append((str(slide.absolute()), None, f"{slide.absolute()}: cannot be resolved ({e})"))
                    continue
                try:
                    plan.append((source, client.submit_path(source, args.um_per_px), None))
                except ServiceError as e:
                    if e.code == "TIMEOUT":
                        raise
                    plan.append((source, None, f"{source}: {e}"))
            jobs = {job_id: source for source, job_id, _ in plan if job_id is not None}
            records: dict[str, list[dict]] = {j: [] for j in jobs}
            summaries: dict[str, dict] = {}
            for event in client.events(list(jobs)):
                if event.kind == "cell":
                    records[event.job_id].append(event.record)
                    if not args.json:
                        print(f"{jobs[event.job_id]}\t{event.seq}\t{event.record.get('class')}", flush=True)
                else:
                    summaries[event.job_id] = event.header
                    if not args.json:
                        print(f"{jobs[event.job_id]}\t{event.header['state']}\tcells={event.header['cells']}\t"
                              f"digest={event.header['digest']}", flush=True)
    except CytoedgeError as e:
        print(f"cytoedge submit: {e}", file=sys.stderr)
        return 2
    entries, errors = [], []
    for source, job_id, refusal in plan:
        if job_id is None:
            entries.append(slide_entry(source, [], None, refusal))
            errors.append(refusal)
            continue
        head = summaries[job_id]
        error = (head.get("error") or {}).get("message")  # worded as `cytoedge score` words it
        if error is not None and source not in error:
            error = f"{source}: {error}"
        if error is None and not records[job_id]:
            error = f"{source}: no white cells found (empty field, wrong scale, or not a blood smear)"
        errors.extend(f["error"] for f in (head.get("summary") or {}).get("failures", []))  # fields of a folder
        if error is not None:
            errors.append(error)
        entries.append(slide_entry(source, records[job_id], head.get("summary"), error))
    for entry in entries:  # the slide's identity, as `score` records it (the daemon reads the same file)
        with contextlib.suppress(OSError):
            entry["source_sha256"] = source_sha256(entry["source"])
    for error in errors:
        print(f"cytoedge submit: {error}", file=sys.stderr)
    if args.json:
        model.pop("name", None)
        run_info = {"service": args.endpoint, "jobs": {source: job_id for job_id, source in jobs.items()}}
        print(json.dumps(build_slides_document(entries, model, run_info), indent=2))
    return 1 if errors else 0
