"""relaxtune.report.render: the markdown carries the run's own numbers; the HTML (markdown-it-py) is one
self-contained page with real tables."""

from __future__ import annotations

import html
import re

from relaxtune.report import format_value, markdown_to_html
from relaxtune.report.render import _table


def test_report_markdown_numbers(report):
    result, summary = report
    md = result.markdown.read_text()
    assert result.markdown.name == "report.md" and result.html.exists()
    # numbers from summary.json, formatted as the report formats them
    assert format_value(summary["val_before"]["dq_mean"]) in md
    assert format_value(summary["val_after"]["dq_mean"]) in md
    assert f"best epoch {summary['best_epoch']}" in md
    moved = summary["parameter_movement"]["model"]
    assert format_value(moved["relative"]) in md and format_value(moved["absolute"]) in md
    assert "| `lr` | 0.0030 |" in md and "| `grad` | full |" in md
    assert "si2_relax" in md and "vacancy_1" in md
    assert "Missing" not in md
    # the run's retention check, item by item with its verdict
    kept = summary["retention"]
    assert "## Retention" in md and f"{kept['counts']['worse']} worse" in md
    assert all(item["item"].replace("|", "\\|") in md for item in kept["items"])  # a | in a cell is escaped


def test_report_html_is_self_contained(report):
    result, summary = report
    page = result.html.read_text()
    assert page.count("data:image/png;base64,") == len(result.plots)
    assert 'src="curves.png"' not in page
    assert "<table>" in page and "<h2>Settings</h2>" in page
    cells = re.findall(r"<td>(.*?)</td>", page)
    assert all(html.escape(item["item"], quote=False) in cells for item in summary["retention"]["items"])


def test_report_html_parameter_table_is_a_table(report):
    """The parameter-movement table, whose headers hold ||θ₀||, is one table of 5 columns in the HTML."""
    result, summary = report
    page = result.html.read_text()
    section = page.split("<h2>Parameter movement per group</h2>")[1].split("<h2>")[0]
    table = re.search(r"<table>.*?</table>", section, re.S).group(0)
    header = re.findall(r"<th>(.*?)</th>", table)
    assert header == ["group", "parameters", "||θ₀||", "||θ − θ₀||", "relative"]
    cells = re.findall(r"<td>(.*?)</td>", table)
    moved = summary["parameter_movement"]["model"]
    assert cells[:5] == ["model", format_value(moved["n"]), format_value(moved["initial_norm"]),
                         format_value(moved["absolute"]), format_value(moved["relative"])]


def test_markdown_to_html(tmp_path):
    (tmp_path / "plot.png").write_bytes(b"\x89PNG\r\n\x1a\nfake")
    table = "\n".join(_table(["a | b", "c"], [["x|y", 1.5], ["`k`", None]]))
    md = f"# T\n\nSome `code` and **bold** <x>.\n\n{table}\n\n- one\n- two\n\n![alt](missing.png)\n\n![p](plot.png)\n"
    page = markdown_to_html(md, tmp_path)
    assert "<h1>T</h1>" in page and "<code>code</code>" in page and "<strong>bold</strong>" in page
    assert "&lt;x&gt;" in page and "<li>two</li>" in page
    assert re.findall(r"<th>(.*?)</th>", page) == ["a | b", "c"]
    assert re.findall(r"<td>(.*?)</td>", page) == ["x|y", "1.5000", "<code>k</code>", "–"]
    assert 'src="missing.png"' in page  # not found: left as a reference
    assert 'src="data:image/png;base64,iVBORw0KGgpmYWtl"' in page
