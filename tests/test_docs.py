"""The documentation site (mkdocs.yml, docs/): it builds with ``mkdocs build --strict`` (no broken link or anchor,
no page missing from the nav, no docstring griffe cannot read), its API pages document the objects they name,
and the user guide mentions only command-line options and TrainConfig fields that exist.

About 5 s on a 2-core CPU: one build (static analysis of src/ by griffe, nothing imported) shared by the tests.
"""

from __future__ import annotations

import dataclasses
import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"

#: objects each API page must document (as the ``id`` of a heading in its HTML), besides every ``::: name``
EXPECTED = {
    "state": ["relaxtune.state.Batch", "relaxtune.state.Batch.from_atoms", "relaxtune.state.Batch.to_atoms"],
    "relax": ["relaxtune.relax.relax", "relaxtune.relax.RelaxConfig", "relaxtune.relax.RelaxResult",
              "relaxtune.relax.implicit", "relaxtune.relax.steps", "relaxtune.relax.cell"],
    "potentials": ["relaxtune.potentials.load_model", "relaxtune.potentials.base.EnergyModel",
                   "relaxtune.potentials.chgnet.CHGNetModel"],
    "metrics": ["relaxtune.metrics.dq", "relaxtune.metrics.rmsd"],
    "evaluate": ["relaxtune.evaluate.evaluate"],
    "train": ["relaxtune.train.config.TrainConfig", "relaxtune.train.finetune.finetune"],
    "retention": ["relaxtune.retention.retention", "relaxtune.retention.Tolerances"],
    "calculator": ["relaxtune.calculator.RelaxtuneCalculator"],
    "data": ["relaxtune.data.load_pairs", "relaxtune.data.split_pairs", "relaxtune.data.RelaxationPair"],
    # the report module or package: the same public names either way
    "report": ["relaxtune.report.write_report", "relaxtune.report.load_run", "relaxtune.report.ReportError",
               "relaxtune.report.markdown_to_html"],
}

#: options in the docs that belong to other programs (torchrun, SLURM, the benchmark scripts, mkdocs), and --help
FOREIGN_OPTIONS = {
    "--nproc_per_node", "--standalone", "--nnodes", "--rdzv_id", "--rdzv_backend", "--rdzv_endpoint",
    "--max-restarts", "--job-name", "--nodes", "--ntasks-per-node", "--gpus-per-node", "--cpus-per-task", "--time",
    "--count", "--repeats", "--strict", "--site-dir",
    "--help",  # click adds it to every command; it is not one of the params
}


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The site built once with ``mkdocs build --strict`` (warnings are errors)."""
    try:
        import mkdocs  # noqa: F401
        import mkdocstrings_handlers.python  # noqa: F401
    except ImportError as exc:
        pytest.fail(f"the docs tools are missing ({exc}): pip install -e '.[test]' (or '.[docs]')")
    out = tmp_path_factory.mktemp("site")
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stdout}\n{proc.stderr}"
    return out


def _page(site: Path, name: str) -> str:
    return (site / "api" / name / "index.html").read_text()


def test_site_builds_with_every_page(site):
    for page in ["index.html", "results/index.html", "guide/finetune/index.html", "api/index.html",
                 "report-example/report.html"]:
        assert (site / page).is_file(), page
    for md in sorted((DOCS / "guide").glob("*.md")) + sorted((DOCS / "api").glob("*.md")):
        assert (site / md.parent.name / md.stem / "index.html").is_file() or md.stem == "index", md


def test_api_pages_document_their_objects(site):
    pages = {md.stem: md.read_text() for md in sorted((DOCS / "api").glob("*.md"))}
    assert set(EXPECTED) <= set(pages), f"API pages missing: {sorted(set(EXPECTED) - set(pages))}"
    for name, text in pages.items():
        html = _page(site, name) if name != "index" else (site / "api" / "index.html").read_text()
        wanted = re.findall(r"^::: *([\w.]+)", text, flags=re.M) + EXPECTED.get(name, [])
        missing = [obj for obj in wanted if f'id="{obj}"' not in html]
        assert not missing, f"docs/api/{name}.md: not documented in the built page: {missing}"
    # the relax page shows the signatures, with the batch they take
    relax = _page(site, "relax")
    assert "Batch" in relax and "RelaxConfig" in relax


def test_every_trainconfig_field_is_documented(site):
    from relaxtune.train.config import TrainConfig

    html = _page(site, "train")
    missing = [f.name for f in dataclasses.fields(TrainConfig)
               if f'id="relaxtune.train.config.TrainConfig.{f.name}"' not in html]
    assert not missing, f"TrainConfig fields absent from the API page: {missing}"


def _cli_options() -> dict[str, set[str]]:
    """Every option of every ``relaxtune`` command, by command path (``finetune``, ``data generate``, ...)."""
    import typer.main

    from relaxtune.cli import app

    for name in ("relax_cmd", "finetune_cmd", "evaluate_cmd", "report_cmd", "data_cmd"):
        importlib.import_module(f"relaxtune.cli.{name}")
    options: dict[str, set[str]] = {}

    def walk(command, path: str) -> None:
        options[path] = {o for p in command.params for o in (*p.opts, *p.secondary_opts) if o.startswith("-")}
        for name, sub in (getattr(command, "commands", None) or {}).items():
            walk(sub, f"{path} {name}".strip())

    walk(typer.main.get_command(app), "")
    return options


def test_guide_mentions_only_real_options():
    known = set().union(*_cli_options().values()) | FOREIGN_OPTIONS
    pages = [DOCS / "index.md", *sorted((DOCS / "guide").glob("*.md")), *sorted((DOCS / "api").glob("*.md"))]
    unknown = {}
    for page in pages:
        found = set(re.findall(r"(?<![\w-])--[a-z][\w-]*", page.read_text()))
        if found - known:
            unknown[str(page.relative_to(ROOT))] = sorted(found - known)
    assert not unknown, f"options that no relaxtune command has: {unknown}"


def test_finetune_guide_settings_are_trainconfig_fields():
    from relaxtune.train.config import TrainConfig

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    flags = _cli_options()["finetune"]
    text = (DOCS / "guide" / "finetune.md").read_text()
    section = text.split("## Settings from a file", 1)[1].split("\n## ", 1)[0]
    example = re.search(r"```yaml\n(.*?)```", section, flags=re.S).group(1)
    keys = re.findall(r"^(\w+):", example, flags=re.M)
    table = re.findall(r"^\| `(\w+)` \|", section, flags=re.M)
    assert keys and table
    assert not set(keys) - fields, f"run.yaml example: not TrainConfig fields: {sorted(set(keys) - fields)}"
    assert not set(table) - fields, f"file-only table: not TrainConfig fields: {sorted(set(table) - fields)}"
    # the table lists settings without a command-line option: a field that gained one belongs in --help instead
    with_flag = [name for name in table if f"--{name.replace('_', '-')}" in flags]
    assert not with_flag, f"file-only table lists fields that have an option: {with_flag}"
