"""relaxtune.report.plots: every plot of a real run's report is a real, non-blank PNG linked from the markdown."""

from __future__ import annotations

import matplotlib.image as mpimg


def test_report_plots_are_real_pngs(report):
    result, _ = report
    md = result.markdown.read_text()
    assert set(result.plots) == {"curves", "scatter", "bars", "displacements", "traces", "movement"}
    for name, png in result.plots.items():
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        img = mpimg.imread(png)
        assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 300, name
        assert img[..., :3].std() > 0.01, f"{name} is blank"
        assert f"]({png.name})" in md, name
