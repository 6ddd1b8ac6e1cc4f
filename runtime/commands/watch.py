"""``cytoedge watch JOB_ID...``: follow jobs on a running daemon and print their cells as they come.

Attach from the start, or after ``--from-seq N`` (the last sequence number already processed, as
an application that stores its progress would pass); one JSON line per cell with ``--json-lines``.
"""
from __future__ import annotations

import argparse
import json
import sys

from cytoedge.runtime.commands.submit import add_client_arguments, connect


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("watch", help="stream a job's results from a running daemon", description=__doc__)
    p.add_argument("job_ids", nargs="+", metavar="JOB_ID", help="job ids (from ACCEPTED / cytoedge submit)")
    p.add_argument("--from-seq", type=int, default=0, help="last sequence number already processed (default 0)")
    p.add_argument("--json-lines", action="store_true", help="one JSON object per cell, progress and summary")
    add_client_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from cytoedge.runtime.errors import CytoedgeError

    try:
        with connect(args) as client:
            last = {j: args.from_seq for j in args.job_ids}
            for event in client.events(args.job_ids, last_acked=last, progress=True, attach=True):
                if args.json_lines:
                    doc = {"event": event.kind, "job_id": event.job_id, **event.header}
                    if event.kind == "cell":
                        doc["record"] = event.record
                    print(json.dumps(doc), flush=True)
                elif event.kind == "cell":
                    print(f"{event.job_id}\t{event.seq}\t{event.record.get('class')}", flush=True)
                elif event.kind == "progress":
                    h = event.header
                    print(f"{event.job_id}\t{h['state']}\tcells={h['cells']}\tacked={h['acked']}", file=sys.stderr)
                else:
                    h = event.header
                    checked = {True: "digest ok", False: "DIGEST MISMATCH", None: "digest not checked (partial)"}
                    print(f"{event.job_id}\t{h['state']}\tcells={h['cells']}\t{checked[event.digest_ok]}", flush=True)
    except CytoedgeError as e:
        print(f"cytoedge watch: {e}", file=sys.stderr)
        return 2
    return 0
