"""Dataset summaries: what `relaxtune data info` reports."""

from swdata import make_cell_relaxation, make_sw_pairs

from relaxtune.data.info import format_info, summarize_pairs
from relaxtune.data.pairs import frame_stress


def test_summary_counts_relaxed_structures_with_a_stress():
    cell_pair, _ = make_cell_relaxation()
    fixed = make_sw_pairs(2)
    assert frame_stress(cell_pair.final).shape == (3, 3) and frame_stress(fixed[0].final) is None
    info = summarize_pairs([cell_pair, *fixed])
    assert info["n_with_final_stress"] == 1
    info["settings"]["level"] = {"a": 2, "b": 1}  # as in a dataset made at two levels
    text = format_info({"source": "x", **info})
    assert "relaxed structures with a DFT stress: 1 of 3" in text
