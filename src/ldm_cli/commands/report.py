"""A small report made of sections — text, tables, code and images — written twice:
as Markdown (`report.md`, images linked) and as a self-contained HTML page
(`report.html`, images inlined as base64) that opens in any browser."""

from __future__ import annotations

import base64
import html
import mimetypes
import os
from dataclasses import dataclass, field
from pathlib import Path

from ldm_cli.common.files import atomic_write


@dataclass
class Block:
    kind: str  # "heading", "text", "table", "code", "image"
    text: str = ""
    rows: list[list[str]] = field(default_factory=list)
    path: Path | None = None


@dataclass
class Report:
    title: str
    folder: Path
    blocks: list[Block] = field(default_factory=list)

    def heading(self, text: str) -> None:
        self.blocks.append(Block("heading", text))

    def text(self, text: str) -> None:
        self.blocks.append(Block("text", text))

    def table(self, header: list[str], rows: list[list[str]]) -> None:
        self.blocks.append(Block("table", rows=[header, *rows]))

    def code(self, text: str) -> None:
        self.blocks.append(Block("code", text))

    def image(self, path: Path, caption: str) -> None:
        """An image (inside `folder`) with the one line that says what it shows."""
        self.blocks.append(Block("image", caption, path=path))

    # ------------------------------------------------------------------ rendering

    def markdown(self) -> str:
        out = [f"# {self.title}", ""]
        for b in self.blocks:
            if b.kind == "heading":
                out += [f"## {b.text}", ""]
            elif b.kind == "text":
                out += [b.text, ""]
            elif b.kind == "table":
                header, *rows = b.rows
                out += ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
                out += ["| " + " | ".join(r) + " |" for r in rows] + [""]
            elif b.kind == "code":
                out += ["```toml", b.text.rstrip(), "```", ""]
            else:
                rel = os.path.relpath(b.path, self.folder)
                out += [f"![{b.text}]({rel})", "", f"*{b.text}*", ""]
        return "\n".join(out)

    def html(self) -> str:
        parts = [
            "<!doctype html><html><head><meta charset='utf-8'>",
            f"<title>{html.escape(self.title)}</title>",
            "<style>body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
            "img{max-width:100%;image-rendering:pixelated;border:1px solid #ddd}"
            "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}"
            "pre{background:#f6f6f6;padding:8px;overflow:auto}figcaption{color:#444;margin-bottom:1.5em}</style>",
            f"</head><body><h1>{html.escape(self.title)}</h1>",
        ]
        for b in self.blocks:
            if b.kind == "heading":
                parts.append(f"<h2>{html.escape(b.text)}</h2>")
            elif b.kind == "text":
                parts.append(f"<p>{html.escape(b.text)}</p>")
            elif b.kind == "table":
                header, *rows = b.rows
                parts.append("<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>")
                parts += ["<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows]
                parts.append("</table>")
            elif b.kind == "code":
                parts.append(f"<pre>{html.escape(b.text)}</pre>")
            else:
                data = base64.b64encode(b.path.read_bytes()).decode("ascii")
                mime = mimetypes.guess_type(b.path.name)[0] or "image/png"
                parts.append(f"<figure><img src='data:{mime};base64,{data}' alt='{html.escape(b.text)}'>"
                             f"<figcaption>{html.escape(b.text)}</figcaption></figure>")
        parts.append("</body></html>")
        return "\n".join(parts)

    def write(self, stem: str = "report") -> tuple[Path, Path]:
        """Write `stem`.md and `stem`.html into `folder`, atomically."""
        paths = []
        for name, content in ((f"{stem}.md", self.markdown()), (f"{stem}.html", self.html())):
            path = self.folder / name
            with atomic_write(path) as tmp:
                tmp.write_text(content, encoding="utf-8")
            paths.append(path)
        return paths[0], paths[1]
