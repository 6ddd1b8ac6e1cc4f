"""Reading a JSON document a person gave on the command line: every way it can be wrong is one line that
names the file, what was expected, and what was wrong."""
from __future__ import annotations

import json
from pathlib import Path

from cytoedge.runtime.errors import CytoedgeError


def read_json(path: Path, what: str, error: type[CytoedgeError] = CytoedgeError):
    """The parsed document at ``path`` (``what``: what it should be, for the message)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise error(f"{path}: no such file") from None
    except IsADirectoryError:
        raise error(f"{path}: is a folder, not a {what}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise error(f"{path}: cannot be read ({e})") from None
    except json.JSONDecodeError as e:
        raise error(f"{path}: not valid JSON ({e.msg} at line {e.lineno}); expected a {what}") from None
