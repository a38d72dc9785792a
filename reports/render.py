"""Write a report's `Table`s, warnings and figures as Markdown, self-contained HTML and LaTeX.

Notes may use two inline marks, `**bold**` and a back-quoted `name`, which each format
translates; cell text is plain and escaped for each format. Text from records (a command, a
path, a device name, an error) is never markup in any of them: HTML's special characters are
escaped in Markdown as in HTML, LaTeX's in LaTeX, and a line break, which would end a
Markdown table row or a LaTeX comment and make the rest live, is shown as `\n`.
"""

from __future__ import annotations

import base64
import html
import re
from dataclasses import dataclass

from .display import Cell, Table
from .plots import DPI

WRAP_AT = 40  # characters: a cell longer than this may wrap (HTML) or sets a paragraph column (LaTeX)


@dataclass
class Document:
    """Everything a report shows, in order; the writers below only lay it out."""

    title: str
    intro: str
    warnings: list[str]
    runs: Table
    tables: list[Table]
    failures: list[str]
    figures: list[tuple[str, str, bytes]]  # (key, title, PNG bytes)


# Everything that ends a line for some reader (Python's str.splitlines, Markdown, TeX).
LINE_BREAKS = re.compile(r"\r\n|[\r\n\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029]")


def one_line(text: str) -> str:
    """`text` with every line break shown as the two characters `\n`."""
    return LINE_BREAKS.sub(lambda _: "\\n", text)


def md_text(text: str) -> str:
    """Record text for Markdown: on one line, with no raw HTML (`<`, `>`, `&` as entities,
    which every Markdown renderer shows as the characters)."""
    return html.escape(one_line(text), quote=False)


def _inline(text: str, bold: tuple[str, str], code: tuple[str, str]) -> str:
    text = re.sub(r"\*\*(.+?)\*\*", lambda m: bold[0] + m.group(1) + bold[1], text)
    return re.sub(r"`([^`]+)`", lambda m: code[0] + m.group(1) + code[1], text)


# --- Markdown --------------------------------------------------------------------------------


def _md_cell(text: str, best: bool) -> str:
    text = md_text(text).replace("|", "\\|")
    return f"**{text}**" if best and text != "-" else text


def row_groups(table: Table) -> list[tuple[str, list[list[Cell]]]]:
    """The table's rows as (label, rows) runs of consecutive rows sharing a group label; one
    run with an empty label for a table without groups."""
    if not table.groups:
        return [("", table.rows)]
    runs: list[tuple[str, list[list[Cell]]]] = []
    for label, row in zip(table.groups, table.rows, strict=True):
        if runs and runs[-1][0] == label:
            runs[-1][1].append(row)
        else:
            runs.append((label, [row]))
    return runs


def markdown_table(table: Table) -> str:
    """Pipe tables (one per row group, under its label in bold) and the notes; a table
    without rows is its notes alone (they say why)."""
    notes = "\n".join(f"{md_text(note)}\n" for note in table.notes)
    if not table.rows:
        return notes
    align = ["---:" if i in table.numeric else "---" for i in range(len(table.columns))]
    parts = []
    for label, rows in row_groups(table):
        lines = [f"**{_md_cell(label, False)}**", ""] if label else []
        lines += ["| " + " | ".join(_md_cell(c, False) for c in table.columns) + " |",
                  "| " + " | ".join(align) + " |"]
        lines += ["| " + " | ".join(_md_cell(c.text, c.best) for c in row) + " |" for row in rows]
        parts.append("\n".join(lines) + "\n")
    return "\n".join(parts) + "\n" + notes


def markdown(doc: Document) -> str:
    parts = [f"# {md_text(doc.title)}\n\n{md_text(doc.intro)}\n"]
    parts += [f"> **Warning:** {md_text(w)}\n" for w in doc.warnings]
    for table in [doc.runs, *doc.tables]:
        parts.append(f"## {md_text(table.title)}\n\n{markdown_table(table)}")
        if table.key == "accuracy" and doc.failures:
            parts.append("### Failed units\n\n" + "".join(f"- {md_text(f)}\n"
                                                            for f in doc.failures))
    parts.append("## Plots\n")
    parts += [f"### {title}\n\n![{title}]({key}.png)\n" for key, title, _ in doc.figures]
    return "\n".join(parts)


# --- HTML ------------------------------------------------------------------------------------

CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: #1f2328;
       margin: 0 auto; max-width: 1500px; padding: 24px; }
h1 { font-size: 24px; } h2 { font-size: 19px; margin-top: 32px; border-bottom: 1px solid #d0d7de; }
h3 { font-size: 15px; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; margin: 8px 0; font-size: 13px; }
th, td { padding: 4px 10px; border-bottom: 1px solid #d0d7de; text-align: left;
         vertical-align: top; white-space: nowrap; }
th { background: #f6f8fa; white-space: normal; min-width: 4em; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
td.long { white-space: normal; min-width: 12em; overflow-wrap: anywhere; }
tr:nth-child(even) td { background: #fafbfc; }
p.note { color: #57606a; font-size: 13px; margin: 4px 0; max-width: 1100px; }
p.group { font-weight: 600; margin: 14px 0 2px; }
.warning { background: #fff8c5; border: 1px solid #d4a72c; padding: 8px 12px; margin: 8px 0; }
img { max-width: 100%; height: auto; }
code { background: #f6f8fa; padding: 0 3px; }
"""


def _html_text(text: str) -> str:
    return _inline(html.escape(text), ("<strong>", "</strong>"), ("<code>", "</code>"))


def html_table(table: Table) -> str:
    """One HTML table per row group (under its label), then the notes."""
    num = ' class="num"'
    head = "".join(f"<th{num if i in table.numeric else ''}>{html.escape(c)}</th>"
                   for i, c in enumerate(table.columns))
    notes = "".join(f'<p class="note">{_html_text(n)}</p>' for n in table.notes)
    if not table.rows:
        return notes
    parts = []
    for index, (label, rows) in enumerate(row_groups(table)):
        body = []
        for row in rows:
            cells = []
            for i, cell in enumerate(row):
                text = html.escape(cell.text)
                text = f"<strong>{text}</strong>" if cell.best else text
                cls = num if i in table.numeric else (
                    ' class="long"' if len(cell.text) > WRAP_AT or table.key == "runs" else "")
                cells.append(f"<td{cls}>{text}</td>")
            body.append("<tr>" + "".join(cells) + "</tr>")
        anchor = table.key if index == 0 else f"{table.key}-{index}"
        title = f'<p class="group">{html.escape(label)}</p>' if label else ""
        parts.append(f'{title}<div class="scroll"><table id="{anchor}"><thead><tr>{head}</tr>'
                     f"</thead><tbody>{''.join(body)}</tbody></table></div>")
    return "".join(parts) + notes


def _display_width(png: bytes) -> int:
    """CSS width for a figure: its pixel width (in the PNG header) shown at 100 dpi, so text
    in the plot is about as large as the page's."""
    return int.from_bytes(png[16:20], "big") * 100 // DPI


def html_page(doc: Document) -> str:
    """One file with everything inline (style, PNGs as base64 data URIs): no network."""
    parts = [f"<h1>{html.escape(doc.title)}</h1>", f"<p>{_html_text(doc.intro)}</p>"]
    parts += [f'<div class="warning"><strong>Warning:</strong> {_html_text(w)}</div>'
              for w in doc.warnings]
    for table in [doc.runs, *doc.tables]:
        parts.append(f"<h2>{html.escape(table.title)}</h2>{html_table(table)}")
        if table.key == "accuracy" and doc.failures:
            items = "".join(f"<li>{html.escape(f)}</li>" for f in doc.failures)
            parts.append(f"<h3>Failed units</h3><ul>{items}</ul>")
    parts.append("<h2>Plots</h2>")
    for key, title, png in doc.figures:
        data = base64.b64encode(png).decode("ascii")
        parts.append(f'<h3 id="{key}">{html.escape(title)}</h3>'
                     f'<img alt="{html.escape(title)}" width="{_display_width(png)}" '
                     f'src="data:image/png;base64,{data}">')
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>{html.escape(doc.title)}</title><style>{CSS}</style></head>"
            f"<body>{''.join(parts)}</body></html>\n")


# --- LaTeX -----------------------------------------------------------------------------------

TEX_ESCAPES = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#",
               "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}",
               "^": r"\textasciicircum{}", "±": r"$\pm$", "×": r"$\times$"}


def tex_escape(text: str) -> str:
    """Text for a LaTeX cell or caption: special characters escaped, line breaks as spaces
    (an empty line would end the paragraph inside a table)."""
    return "".join(TEX_ESCAPES.get(ch, ch) for ch in LINE_BREAKS.sub(" ", text))


def tex_comment(text: str) -> str:
    """A `%` comment line holding `text`: on one line, or the rest would be live LaTeX."""
    return "% " + one_line(text)


def _tex_header(text: str) -> str:
    """`time / epoch (s)` -> the name over its unit, so wide cost tables stay narrow."""
    name, paren, unit = text.partition(" (")
    if not paren:
        return tex_escape(text)
    return rf"\begin{{tabular}}[b]{{@{{}}c@{{}}}}{tex_escape(name)}\\({tex_escape(unit)}\end{{tabular}}"


def _tex_cell(text: str, best: bool) -> str:
    text = "--" if text == "-" else tex_escape(text)
    return rf"\textbf{{{text}}}" if best else text


def tex_table(table: Table) -> str:
    """A booktabs float; shrunk to the line width only when wider than it."""
    spec = []
    for i in range(len(table.columns)):
        longest = max((len(row[i].text) for row in table.rows), default=0)
        spec.append("r" if i in table.numeric else
                    r">{\raggedright\arraybackslash}p{4cm}" if longest > WRAP_AT else "l")
    lines = [r"\begin{table}[htbp]", r"\centering", r"\small", r"\setlength{\tabcolsep}{4pt}",
             rf"\caption{{{tex_escape(table.title)}}}", rf"\label{{tab:bpfree-{table.key}}}",
             r"\resizebox{\ifdim\width>\linewidth\linewidth\else\width\fi}{!}{%",
             rf"\begin{{tabular}}{{{''.join(spec)}}}", r"\toprule",
             " & ".join(_tex_header(c) for c in table.columns) + r" \\", r"\midrule"]
    for index, (label, rows) in enumerate(row_groups(table)):
        if label:
            if index:
                lines.append(r"\midrule")
            lines.append(rf"\multicolumn{{{len(table.columns)}}}{{@{{}}l}}"
                         rf"{{\textit{{{tex_escape(label)}}}}} \\")
        lines += [" & ".join(_tex_cell(c.text, c.best) for c in row) + r" \\" for row in rows]
    lines += [r"\bottomrule", r"\end{tabular}}"]
    notes = " ".join(_inline(tex_escape(n), (r"\textbf{", "}"), (r"\texttt{", "}"))
                     for n in table.notes)
    lines += [rf"\par\smallskip\parbox{{\linewidth}}{{\footnotesize {notes}}}", r"\end{table}"]
    return "\n".join(lines) + "\n"


def latex(doc: Document) -> str:
    """booktabs tables, one `table` float each; provenance as comments."""
    head = ["% bpfree report tables. Needs \\usepackage{booktabs,graphicx,array}.",
            tex_comment(doc.intro)]
    for row in doc.runs.rows:
        head.append(tex_comment("run: " + " | ".join(c.text for c in row)))
    head += [tex_comment(f"WARNING: {w}") for w in doc.warnings]
    return "\n".join(head) + "\n\n" + "\n".join(tex_table(t) for t in doc.tables if t.rows)
