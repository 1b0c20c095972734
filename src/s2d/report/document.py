"""One report, two renderings: Markdown for the repository and a self-contained HTML page for people.

Written by hand because the two formats need only headings, paragraphs, tables and figures, and no Markdown
library gives an HTML page with the images embedded.
"""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field
from pathlib import Path

from s2d.report.markdown import fmt, md_table

_STYLE = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:14px}th,td{border:1px solid #ccc;padding:4px 8px;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}figure{margin:1.5em 0}
img{max-width:100%;border:1px solid #eee}figcaption{color:#555;font-size:14px}code{background:#f5f5f5;padding:1px 3px}
.lead{font-size:17px;line-height:1.5}"""


@dataclass
class Document:
    title: str
    parts: list[tuple] = field(default_factory=list)

    def heading(self, text: str) -> None:
        self.parts.append(("h2", text))

    def paragraph(self, text: str, lead: bool = False) -> None:
        self.parts.append(("p", text, lead))

    def bullets(self, items: list[str]) -> None:
        self.parts.append(("ul", items))

    def table(self, headers: list[str], rows: list[list], table_id: str) -> None:
        self.parts.append(("table", headers, rows, table_id))

    def figure(self, path: Path, caption: str) -> None:
        self.parts.append(("figure", Path(path), caption))

    def code(self, text: str) -> None:
        self.parts.append(("code", text))

    def markdown(self, root: Path) -> str:
        out = [f"# {self.title}\n"]
        for part in self.parts:
            kind = part[0]
            if kind == "h2":
                out.append(f"## {part[1]}\n")
            elif kind == "p":
                out.append(part[1] + "\n")
            elif kind == "ul":
                out.append("\n".join(f"- {item}" for item in part[1]) + "\n")
            elif kind == "table":
                out.append(md_table(part[1], part[2]))
            elif kind == "figure":
                out.append(f"![{part[2]}]({part[1].relative_to(root).as_posix()})\n\n*{part[2]}*\n")
            elif kind == "code":
                out.append(f"```\n{part[1]}\n```\n")
        return "\n".join(out)

    def html(self) -> str:
        e = html.escape
        body = [f"<h1>{e(self.title)}</h1>"]
        for part in self.parts:
            kind = part[0]
            if kind == "h2":
                body.append(f"<h2>{e(part[1])}</h2>")
            elif kind == "p":
                lead = ' class="lead"' if part[2] else ""
                body.append(f"<p{lead}>{e(part[1])}</p>")
            elif kind == "ul":
                body.append("<ul>" + "".join(f"<li>{e(item)}</li>" for item in part[1]) + "</ul>")
            elif kind == "table":
                head = "".join(f"<th>{e(h)}</th>" for h in part[1])
                rows = "".join("<tr>" + "".join(f"<td>{e(fmt(c))}</td>" for c in row) + "</tr>" for row in part[2])
                body.append(f'<table id="{e(part[3])}"><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>')
            elif kind == "figure":
                data = base64.b64encode(part[1].read_bytes()).decode("ascii")
                body.append(f'<figure><img alt="{e(part[2])}" src="data:image/png;base64,{data}">'
                            f"<figcaption>{e(part[2])}</figcaption></figure>")
            elif kind == "code":
                body.append(f"<pre><code>{e(part[1])}</code></pre>")
        return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{e(self.title)}</title>'
                f"<style>{_STYLE}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")
