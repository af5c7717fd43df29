"""A recipe's report: each line is printed as it comes and kept for report.md."""

from __future__ import annotations

from pathlib import Path


class Report:
    """`say = Report("MiniMind demo")`; `say("a line")` prints and keeps it; `say.write(path)` writes them all."""

    def __init__(self, title: str) -> None:
        self.lines = [f"# {title}", ""]

    def __call__(self, text: str = "") -> None:
        print(text, flush=True)
        self.lines.append(text)

    def write(self, path: Path) -> None:
        path.write_text("\n".join(self.lines) + "\n", encoding="utf-8")
        print(f"report: {path}")
