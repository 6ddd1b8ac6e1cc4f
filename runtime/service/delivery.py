"""Delivery: journaled cells → the client, within each job's credit; ACK, RESUME and SUMMARY.

The journal holds every cell under its sequence number before anything is sent, so delivery is
only bookkeeping: which peer a job's results go to, and the next sequence number to send it.
A peer that vanishes loses its attachments; its jobs wait in the journal for a RESUME or an ACK.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable

from cytoedge.runtime.service import journal as J
from cytoedge.runtime.service import protocol as P

log = logging.getLogger(__name__)

PROGRESS_EVERY_S = 0.5

Send = Callable[..., bool]  # (peer, command, header, payload=()) -> delivered to the socket


@dataclass
class Attachment:
    """Where a job's results go: the peer's routing id and the next sequence number to send."""

    peer: bytes
    next_seq: int
    summary_sent: bool = False
    last_progress: float = 0.0


class Delivery:
    """The socket thread's view of who gets which job's cells (see the module docstring)."""

    def __init__(self, journal: J.Journal, send: Send):
        self.journal, self.send = journal, send
        self.attached: dict[str, Attachment] = {}

    def attach(self, job_id: str, peer: bytes, next_seq: int | None = None) -> None:
        """Send ``job_id``'s results to ``peer`` from ``next_seq`` (default: after the last ACK), unless
        it is already attached there."""
        current = self.attached.get(job_id)
        if next_seq is None:
            if current is not None:
                current.peer = peer
                return
            job = self.journal.job(job_id)
            next_seq = (job.acked if job else 0) + 1
        self.attached[job_id] = Attachment(peer, next_seq)

    def peer_gone(self, peer: bytes) -> None:
        gone = [job_id for job_id, a in self.attached.items() if a.peer == peer]
        for job_id in gone:  # its jobs wait in the journal for a RESUME
            del self.attached[job_id]
        log.info("peer gone", extra={"event": "peer_gone", "jobs": gone})

    def progress(self, peer: bytes, job_id: str) -> None:
        job = self.journal.job(job_id)
        received, scored = self.journal.tile_counts(job_id)
        self.send(peer, P.PROGRESS, {"job_id": job_id, "state": job.state, "cells": job.cells, "acked": job.acked,
                                     "tiles_received": received, "tiles_scored": scored})

    def on_ack(self, peer: bytes, msg: P.Message) -> None:
        job = self._job(msg.header["job_id"], P.ACK)
        if msg.header["seq"] > job.cells:
            raise P.ProtocolError(P.BAD_HEADER, f"ACK: seq {msg.header['seq']} but job {job.job_id} has only "
                                                f"{job.cells} cells", P.ACK)
        acked = self.journal.record_ack(job.job_id, msg.header["seq"])
        attachment = self.attached.get(job.job_id)
        if attachment is None:  # e.g. the daemon restarted: the acknowledging peer is where results go
            self.attach(job.job_id, peer, acked + 1)
        else:
            attachment.peer = peer
        self.pump(job.job_id)

    def on_resume(self, peer: bytes, msg: P.Message, window: int | None) -> None:
        header = msg.header
        job = self._job(header["job_id"], P.RESUME)
        if header["last_acked_seq"] > job.cells:
            raise P.ProtocolError(P.BAD_HEADER, f"RESUME: last_acked_seq {header['last_acked_seq']} but job "
                                                f"{job.job_id} has only {job.cells} cells", P.RESUME)
        self.journal.record_ack(job.job_id, header["last_acked_seq"])
        if window:
            self.journal.set_window(job.job_id, window)
        self.attach(job.job_id, peer, header["last_acked_seq"] + 1)
        log.info("job resumed", extra={"event": "resume", "job_id": job.job_id, "from_seq": header["last_acked_seq"] + 1})
        self.progress(peer, job.job_id)
        self.pump(job.job_id)

    def _job(self, job_id: str, command: str) -> J.Job:
        job = self.journal.job(job_id)
        if job is None:
            raise P.ProtocolError(P.UNKNOWN_JOB, f"{command}: no job {job_id} (never submitted, or purged)", command)
        return job

    def pump_all(self) -> None:
        for job_id in list(self.attached):
            self.pump(job_id)

    def pump(self, job_id: str) -> None:
        """Send the job's journaled cells its credit allows, then SUMMARY once it is finished and all sent."""
        attachment = self.attached.get(job_id)
        if attachment is None:
            return
        job = self.journal.job(job_id)
        if job is None:
            self.attached.pop(job_id, None)
            return
        if job.acked >= job.cells and job.state == J.SCORED and self.journal.mark_delivered(job_id):
            log.info("job delivered", extra={"event": "delivered", "job_id": job_id, "cells": job.cells})
            job = self.journal.job(job_id)
        last = min(job.cells, job.acked + job.window)
        if attachment.next_seq <= last:
            for seq, record in self.journal.cells(job_id, attachment.next_seq, last):
                if not self.send(attachment.peer, P.CELL, {"job_id": job_id, "seq": seq}, (record,)):
                    return
                attachment.next_seq = seq + 1
        now = time.monotonic()
        if job.state in J.ACTIVE and now - attachment.last_progress > PROGRESS_EVERY_S:
            attachment.last_progress = now
            self.progress(attachment.peer, job_id)
        if job.state in J.FINISHED and attachment.next_seq > job.cells and not attachment.summary_sent:
            attachment.summary_sent = self.send(attachment.peer, P.SUMMARY, {
                "job_id": job_id, "state": job.state, "cells": job.cells, "digest": job.digest,
                "summary": job.summary, "error": job.error})
        if attachment.summary_sent and job.state == J.DELIVERED:
            self.attached.pop(job_id, None)
