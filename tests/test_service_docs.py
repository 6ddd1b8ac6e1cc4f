"""The integration example's code blocks run against a live daemon (TEST-ONLY PixelStatsScorer),
so what a vendor copies from docs/integration-example.md works as written."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from test_service_daemon import running_daemon
from test_service_support import block_records

EXAMPLE = Path(__file__).resolve().parents[1] / "docs" / "integration-example.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", EXAMPLE.read_text(), flags=re.S)


def test_integration_examples_run_against_a_daemon(tmp_path, monkeypatch, capsys):
    blocks = python_blocks()
    assert len(blocks) == 2
    with running_daemon(tmp_path) as daemon:
        monkeypatch.setenv("CYTOEDGE_ENDPOINT", daemon.endpoint)
        exec(compile(blocks[0], "integration-example.md#python-client", "exec"), {})
        client_out = capsys.readouterr().out
        exec(compile(blocks[1], "integration-example.md#raw-frames", "exec"), {})
        raw_out = capsys.readouterr().out
    field = np.random.default_rng(0).integers(0, 256, (256, 512, 3), dtype=np.uint8)
    expected = len(block_records(field, (0, 0)))
    assert re.search(rf"^done: (scored|delivered) {expected} cells, digest ok: True$", client_out, re.M)
    raw_expected = len(block_records(np.full((128, 128, 3), 235, np.uint8), (0, 0)))
    assert re.search(rf"^cells: {raw_expected} state: (scored|delivered)$", raw_out, re.M)
