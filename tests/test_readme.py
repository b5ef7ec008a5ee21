"""The README's generated result blocks (deme.readme): formatting by hand, replacement of marked blocks only,
and the committed README equal to what the committed tables make."""

from pathlib import Path

import pandas as pd
import pytest

from deme.config import get_profile
from deme.premise import mark_chosen, premise_rows, proportions
from deme.readme import BLOCKS, decimals, interval, markers, render, update_readme

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("low, high, k", [(-0.033, 0.002, 3), (-0.42, 0.04, 2), (-3.0, 1.0, 1), (-1e-5, 1e-5, 6),
                                          (0.0, 0.0, 3)])
def test_decimals_show_the_half_width_to_two_digits(low, high, k):
    assert decimals(low, high) == k


def test_an_interval_that_crosses_zero_never_rounds_to_zero():
    assert interval(-0.0156, -0.0331, 0.0019, "%") == "−0.016% [−0.033, +0.002]"
    assert interval(1.234, 0.5, 2.0) == "+1.23 [+0.50, +2.00]"


def test_render_replaces_only_the_marked_blocks(tmp_path):
    from tests.test_premise import _planted_losses
    rows = premise_rows(get_profile("smoke").replace(num_ranges=4), _planted_losses()).assign(passes=True)
    mark_chosen(rows).to_csv(tmp_path / "premise_fmnist.csv", index=False)
    proportions(get_profile("fmnist-xs")).assign(setting="fmnist-xs").to_csv(tmp_path / "proportions_fmnist.csv",
                                                                               index=False)
    begin, end = markers("premise")
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n\nbefore\n\n{begin}\nstale\n{end}\n\nafter\n")
    assert update_readme(readme, tmp_path)
    text = readme.read_text()
    assert text.startswith("# title\n\nbefore\n\n") and text.endswith("\n\nafter\n") and "stale" not in text
    assert "| finetuning images per method / pretraining images (%) | 5.0% (4 × 20K × 64 / 800K × 128) |" in text
    assert "chosen: **smoke, num_ranges=4**" in text
    assert not update_readme(readme, tmp_path)                       # unchanged the second time
    readme.write_text("no markers\n")
    assert not update_readme(readme, tmp_path) and readme.read_text() == "no markers\n"


def test_the_committed_readme_is_what_the_committed_tables_make():
    text = (REPO / "README.md").read_text()
    present = [name for name in BLOCKS if markers(name)[0] in text]
    assert "premise" in present and "claims" in present
    assert render(text, REPO / "figures") == text, "run `python -m deme readme` and commit README.md"


def test_the_claims_block_has_every_row_of_the_claims_table():
    claims = pd.read_csv(REPO / "figures" / "claims_fmnist.csv")
    block = BLOCKS["claims"](REPO / "figures")
    assert len(block.splitlines()) == 2 + len(claims)
    for x in claims.itertuples():
        assert f"| {x.claim} | {x.measure} | {interval(x.delta, x.ci95_low, x.ci95_high)} | {x.verdict} |" in block
