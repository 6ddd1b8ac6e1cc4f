"""Write one benchmark's section of benchmarks/RESULTS.md, replacing its previous numbers."""
from __future__ import annotations

import os
import platform
import shlex
import sys
from datetime import datetime, timezone
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} logical CPUs, Python {platform.python_version()}, no GPU"


def write_section(key: str, title: str, body: str) -> None:
    """Replace (or append) the block between ``<!-- key:begin -->`` and ``<!-- key:end -->``."""
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    block = (f"<!-- {key}:begin -->\n## {title}\n\nCommand: `{command}`  \nMachine: {machine()}  \n"
             f"Measured: {stamp}\n\n{body.strip()}\n<!-- {key}:end -->")
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n\nEach section is rewritten by the script named in it.\n"
    begin, end = f"<!-- {key}:begin -->", f"<!-- {key}:end -->"
    if begin in text and end in text:
        text = text[: text.index(begin)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    RESULTS.write_text(text)
