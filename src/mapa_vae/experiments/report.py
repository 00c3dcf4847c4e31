"""A report as a list of blocks, rendered to Markdown and to self-contained HTML.

The reproduction builds its report once, as headings, paragraphs, tables and figures, and
writes it twice: ``report.md`` (figures linked) and ``report.html`` (figures inline as base64
PNG), so the two never disagree.
"""

from __future__ import annotations

import base64
import html
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..storage import atomic_write

__all__ = ["STYLE", "Report"]

# A plain string, not an f-string: its braces are CSS's own. Figures never overflow the page.
STYLE = (
    "body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;line-height:1.45}"
    "table{border-collapse:collapse;font-size:90%;margin:0.5em 0}"
    "td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}"
    "td.num{text-align:right;font-variant-numeric:tabular-nums}"
    "th{background:#f3f3f3}"
    "figure{margin:1.5em 0}"
    "img{max-width:100%;height:auto;display:block}"
    "figcaption{color:#555;font-style:italic;margin-top:0.3em}"
)


_NUMBER = re.compile(r"^[-+−]?\d[\d.,eE+\-]*( ± [\d.eE+\-]+| \(1 draw\))?$")


def _cell(text: str) -> str:
    """A Markdown table cell: a ``|`` in the text (``q(i | n)``) must not end the cell."""
    return text.replace("|", "\\|")


@dataclass
class Report:
    """Blocks in order: ``("h", level, text)``, ``("p", text)``, ``("table", header, rows)``,
    ``("img", path, caption)``."""

    title: str
    blocks: list[tuple] = field(default_factory=list)

    def heading(self, text: str, level: int = 2) -> None:
        self.blocks.append(("h", level, text))

    def paragraph(self, text: str) -> None:
        self.blocks.append(("p", text))

    def table(self, header: list[str], rows: list[list[str]]) -> None:
        self.blocks.append(("table", header, rows))

    def figure(self, path: Path, caption: str) -> None:
        if not caption.strip():
            raise ValueError(f"{path}: every figure needs a caption")
        self.blocks.append(("img", Path(path), caption))

    def markdown(self, base: Path) -> str:
        out = [f"# {self.title}", ""]
        for block in self.blocks:
            kind = block[0]
            if kind == "h":
                out += ["#" * block[1] + " " + block[2], ""]
            elif kind == "p":
                out += [block[1], ""]
            elif kind == "table":
                header, rows = block[1], block[2]
                out.append("| " + " | ".join(_cell(h) for h in header) + " |")
                out.append("|" + "---|" * len(header))
                out += ["| " + " | ".join(_cell(c) for c in r) + " |" for r in rows]
                out.append("")
            elif kind == "img":
                rel = block[1].relative_to(base) if block[1].is_relative_to(base) else block[1]
                out += [f"![{block[2]}]({rel.as_posix()})", f"*{block[2]}*", ""]
        return "\n".join(out)

    def html(self) -> str:
        esc = html.escape
        out = [
            "<!doctype html><html><head><meta charset='utf-8'>"
            "<meta name='viewport' content='width=device-width, initial-scale=1'>",
            f"<title>{esc(self.title)}</title><style>{STYLE}</style></head><body>",
            f"<h1>{esc(self.title)}</h1>",
        ]
        for block in self.blocks:
            kind = block[0]
            if kind == "h":
                out.append(f"<h{block[1]}>{esc(block[2])}</h{block[1]}>")
            elif kind == "p":
                out.append(f"<p>{esc(block[1])}</p>")
            elif kind == "table":
                out.append("<table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in block[1]) + "</tr>")
                out += ["<tr>" + "".join(f"<td class='num'>{esc(c)}</td>" if _NUMBER.match(c)
                                         else f"<td>{esc(c)}</td>" for c in r) + "</tr>"
                        for r in block[2]]
                out.append("</table>")
            elif kind == "img":
                data = base64.b64encode(block[1].read_bytes()).decode()
                out.append(f"<figure><img src='data:image/png;base64,{data}' alt='{esc(block[2])}'>"
                           f"<figcaption>{esc(block[2])}</figcaption></figure>")
        out.append("</body></html>")
        return "\n".join(out)

    def write(self, out_dir: Path) -> tuple[Path, Path]:
        md, page = out_dir / "report.md", out_dir / "report.html"
        with atomic_write(md) as f:
            f.write(self.markdown(out_dir).encode())
        with atomic_write(page) as f:
            f.write(self.html().encode())
        return md, page
