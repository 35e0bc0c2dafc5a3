"""Where benchmark tables go, and how they are written."""

from __future__ import annotations

from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def write_table(path: Path, lines: list[str]) -> None:
    """Write a Markdown result to ``path`` and echo it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
    print("\n".join(lines))
