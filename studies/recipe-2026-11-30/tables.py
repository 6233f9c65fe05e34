"""Tables of docs/results.md ("Update, 2026-11-30 (21:50-00:15 UTC): a recipe that fits") from eval/ next to
this file: ``python tables.py [RUN ...]`` prints, for every structure set and start, Dq per structure, the mean,
the geometric mean of the ratio to pretrained (``PRE``) and how many structures got better."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from evaltables import print_tables  # noqa: E402

EVAL = Path(__file__).resolve().parent / "eval"
SETS = {"hot": "unseen defect types (val + test, seeds 1-2)", "r2b": "new rattles (seed 2) of the training types",
        "ho2": "unseen types as of X4-X7 (sub_P included)", "r2": "new rattles as of X4-X7"}

if __name__ == "__main__":
    print_tables(EVAL, SETS, sys.argv[1:] or ["X5", "X4", "X6", "M1", "M1L"])
