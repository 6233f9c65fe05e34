from relaxtune.markdown import markdown_table


def test_table_formats_non_strings_and_escapes_pipes():
    lines = markdown_table(["a", "b|c"], [[1.5, "x|y"], [None, "z"]], fmt=lambda v: "–" if v is None else f"{v:.2f}")
    assert lines == ["| a | b\\|c |", "|---|---|", "| 1.50 | x\\|y |", "| – | z |"]
