"""The README's generated result blocks (deme.readme): formatting by hand, replacement of marked blocks only,
and the committed README equal to what the committed tables make."""

from pathlib import Path

import pandas as pd
import pytest

from deme.config import get_profile
from deme.premise import mark_chosen, premise_rows, proportions, spec
from deme.readme import BLOCKS, decimals, interval, markers, render, update_readme, writer

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
    props = pd.concat([proportions(get_profile("fmnist-xs")).assign(setting="fmnist-xs"),
                       proportions(get_profile("fmnist-xxs")).assign(setting="smoke, num_ranges=4")])
    props.to_csv(tmp_path / "proportions_fmnist.csv", index=False)
    begin, end = markers("premise")
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n\nbefore\n\n{begin}\nstale\n{end}\n\nafter\n")
    assert update_readme(readme, tmp_path)
    text = readme.read_text()
    assert text.startswith("# title\n\nbefore\n\n") and text.endswith("\n\nafter\n") and "stale" not in text
    assert "| finetuning images per method / pretraining images (%) | 5.0% (4 × 20K × 64 / 800K × 128) |" in text
    assert "- smoke, num_ranges=4: passes all three checks — **chosen**" in text
    assert "| quantity | paper | smoke, num_ranges=4 |" in text                    # the chosen setting's column only
    from deme.premise import readme_block
    worse = rows.copy()
    worse.loc[(worse.model == "ensemble - standard") & (worse.range == "all"), "ci95_high"] = 1.0
    worse = worse.assign(chosen=False)
    assert "- smoke, num_ranges=4: fails (i)\n" in readme_block(worse, props) + "\n"
    # a converged base whose setting falls short of (ii): nothing is chosen, the bottom line says which check failed
    short = rows.assign(base_converged=True, base_change_pct=-0.1)
    short.loc[(short.model == "ensemble") & (short.range == "all"), ["delta_pct", "ci95_low", "ci95_high"]] = \
        (-0.2, -0.25, -0.15)
    short = mark_chosen(short.assign(passes=False))
    assert not short.chosen.any()
    short.to_csv(tmp_path / "premise_fmnist.csv", index=False)
    pd.DataFrame(columns=["claim", "measure", "delta", "ci95_low", "ci95_high", "verdict"]).to_csv(
        tmp_path / "claims_fmnist.csv", index=False)
    line = BLOCKS["bottom-line"](tmp_path)
    assert line.startswith("- **The premise is not met** on the converged base (smoke, num_ranges=4,")
    assert "against the base −0.200% [−0.250, −0.150] (fails: a gain of at least 0.3% is asked)" in line
    assert "(`standard`) " in line and "(holds); against the base" in line and line.endswith("own range: holds.")
    assert readme_block(short, props).endswith("once a converged base exists (its gains would include continued "
                                                "pretraining).")
    # a chosen setting other than the embedded default: the bottom line says the claims are not yet on it
    mark_chosen(rows).to_csv(tmp_path / "premise_fmnist.csv", index=False)
    assert "**Not yet adopted**" in BLOCKS["bottom-line"](tmp_path)
    mark_chosen(rows.assign(setting="fmnist")).to_csv(tmp_path / "premise_fmnist.csv", index=False)
    assert "**Not yet adopted**" not in BLOCKS["bottom-line"](tmp_path)
    mark_chosen(rows).to_csv(tmp_path / "premise_fmnist.csv", index=False)
    assert not update_readme(readme, tmp_path)                       # unchanged the second time
    readme.write_text("no markers\n")
    assert not update_readme(readme, tmp_path) and readme.read_text() == "no markers\n"


def test_a_block_whose_table_is_missing_says_which_file_and_what_writes_it(tmp_path):
    begin, end = markers("time")
    readme = tmp_path / "README.md"
    readme.write_text(f"{begin}\nold\n{end}\n")
    assert update_readme(readme, tmp_path)
    assert "*Not produced yet: `figures/reproduce_time_fmnist.csv` is missing (`make reproduce` writes it).*" \
        in readme.read_text()
    assert writer("table1_fmnist.csv") == "make reproduce FULL=1" and writer("capacity_fmnist.csv").endswith(
        "premise --capacity")


def test_the_time_block_gives_the_default_run_and_the_full_run_where_it_was_timed(tmp_path):
    rows = [("01_base_model", 60.0), ("06_ablation", 1500.0), ("total (wall clock)", 3000.0)]
    pd.DataFrame(rows, columns=["stage", "seconds"]).assign(machine="cpu", date="2026-01-01", commit="abc", jobs=2) \
        .to_csv(tmp_path / "reproduce_time_fmnist.csv", index=False)
    assert "**50 min** of wall clock for the 2 stages" in BLOCKS["time"](tmp_path)
    assert "FULL=1" not in BLOCKS["time"](tmp_path)                  # the full run's line only where it was timed
    pd.DataFrame(rows, columns=["stage", "seconds"]).assign(machine="cpu", date="2026-01-02", commit="abc", jobs=2) \
        .to_csv(tmp_path / "reproduce_time_fmnist_full.csv", index=False)
    assert BLOCKS["time"](tmp_path).endswith("`make reproduce FULL=1` (the committed notebooks and figures) on cpu, "
                                             "2026-01-02: **50 min** for 2 stages, the longest 06_ablation (1,500 s).")


def test_the_tables_block_inlines_the_notebooks_tables_and_names_what_is_missing(tmp_path):
    table1 = "Table 1 analog (fmnist): caption\n\n| model | FID |\n|:--|:--|\n| a | 1 |\n"
    (tmp_path / "table1_fmnist.md").write_text(table1)
    (tmp_path / "budget_study_conditional_fmnist.png").write_bytes(b"png")
    text = BLOCKS["tables"](tmp_path)
    assert text.startswith("Table 1 analog (fmnist): caption\n\n| model | FID |") and "| a | 1 |" in text
    assert "*Not produced yet: `figures/table3_fmnist.md` (`make reproduce FULL=1` writes it).*" in text
    assert "![budget study, conditional](figures/budget_study_conditional_fmnist.png)" in text
    assert "Not produced yet: `figures/budget_study_unconditional_fmnist.png`" in text


def test_the_capacity_block_counts_the_verdicts_of_its_cells(tmp_path):
    rows = [{"setting": f"{base}, steps_per_range={b}", "base": base, "parameters": n, "steps_per_range": b,
             "budget_pct": b / 100, "model": m, "condition": "unconditional", "delta_pct": d, "ci95_low": d - 0.1,
             "ci95_high": d + 0.1}
            for n, base in ((18_000, "a"), (1_620_000, "b")) for b in (300, 600)
            for m, d in (("ensemble - standard", -0.5 if b == 300 else 0.0), ("ensemble", -0.5),
                         ("merged (w = 1/N)", 0.5), ("standard", 0.0))]
    pd.DataFrame(rows).to_csv(tmp_path / "capacity_fmnist.csv", index=False)
    text = BLOCKS["capacity"](tmp_path)
    assert text.startswith('`python -m deme premise --capacity "a:steps_per_range=300" "a:steps_per_range=600" '
                           '"b:steps_per_range=300" "b:steps_per_range=600" --jobs 2`: 2 bases '
                           "(18K a, 1.62M b)") and "4 cells" in text
    assert "**ensemble − standard**: better in 2 of 4 cells, worse in 0, not resolved in 2." in text
    assert "**merged (w = 1/N) − base**: better in 0 of 4 cells, worse in 4, not resolved in 0." in text
    cells = [x for x in text.splitlines() if x.startswith("| 1.62M b |")]
    assert cells == ["| 1.62M b | 300 | 3 | −0.50 [−0.60, −0.40] *better* | −0.50 [−0.60, −0.40] *better* | "
                     "+0.50 [+0.40, +0.60] *worse* | +0.00 [−0.10, +0.10] *not resolved* |",
                     "| 1.62M b | 600 | 6 | +0.00 [−0.10, +0.10] *not resolved* | −0.50 [−0.60, −0.40] *better* | "
                     "+0.50 [+0.40, +0.60] *worse* | +0.00 [−0.10, +0.10] *not resolved* |"]


def test_a_capacity_setting_name_is_given_back_as_the_command_takes_it():
    from deme.premise import parse_setting, setting_name
    for name in ("fmnist-xs", "fmnist, steps_per_range=300", "fmnist-xxs, lr=0.0001, steps_per_range=1200"):
        assert setting_name(parse_setting(spec(name))) == name


def test_the_committed_readme_is_what_the_committed_tables_make():
    text = (REPO / "README.md").read_text()
    present = [name for name in BLOCKS if markers(name)[0] in text]
    assert "premise" in present and "claims" in present
    assert render(text, REPO / "figures") == text, "run `python -m deme readme` and commit README.md"


def test_the_claims_block_has_every_row_of_the_claims_table():
    """One row per claim, one column per measure: every (claim, measure) of the CSV sits in its claim's row under
    its measure's column, with its interval and verdict."""
    claims = pd.read_csv(REPO / "figures" / "claims_fmnist.csv")
    lines = BLOCKS["claims"](REPO / "figures").splitlines()
    header = [h.strip() for h in lines[0].strip("|").split("|")]
    table = lines[:lines.index("")]
    assert header == ["claim", *dict.fromkeys(claims.measure)] and len(table) == 2 + claims.claim.nunique()
    rows = {cells[0]: cells for cells in ([c.strip() for c in x.strip("|").split("|")] for x in table[2:])}
    for x in claims.itertuples():
        assert rows[x.claim][header.index(x.measure)] == \
            f"{interval(x.delta, x.ci95_low, x.ci95_high)} *{x.verdict}*"


def test_the_claims_block_counts_comparisons_and_names_the_draws(tmp_path):
    rows = [{"claim": "(b) x", "measure": "held-out loss, unconditional (Δ%)", "delta": -1.0, "ci95_low": -2.0,
             "ci95_high": -0.5, "verdict": "better", "draws": 2},
            {"claim": "(b) x", "measure": "FID, unconditional (Δ)", "delta": 1.0, "ci95_low": -1.0, "ci95_high": 2.0,
             "verdict": "not resolved", "draws": None},
            {"claim": "(c) y", "measure": "held-out loss, unconditional (Δ%)", "delta": 0.1, "ci95_low": -0.1,
             "ci95_high": 0.3, "verdict": "not resolved", "draws": 2}]
    pd.DataFrame(rows).to_csv(tmp_path / "claims_fmnist.csv", index=False)
    text = BLOCKS["claims"](tmp_path)
    assert "3 comparisons, 1 of them resolved." in text
    assert "average 2 independent noise/timestep draws per evaluation image" in text


def test_the_beyond_block_reads_learned_merges_costs_and_ranges(tmp_path):
    rows = [{"model": "learned", "range": "all", "condition": "unconditional", "delta_pct": -0.5, "ci95_low": -0.8,
             "ci95_high": -0.2, "reference": "searched"},
            {"model": "learned", "range": "0", "condition": "unconditional", "delta_pct": 9.0, "ci95_low": 8.0,
             "ci95_high": 10.0, "reference": "searched"},
            {"model": "learned", "range": "all", "condition": "unconditional", "delta_pct": 0.1, "ci95_low": -0.2,
             "ci95_high": 0.4, "reference": "uniform"}]
    pd.DataFrame(rows).to_csv(tmp_path / "merge_learned_fmnist.csv", index=False)
    pd.DataFrame([{"method": "coordinate search (04)", "seconds": 40.0}, {"method": "learned", "seconds": 12.4}]
                 ).to_csv(tmp_path / "merge_costs_fmnist.csv", index=False)
    text = BLOCKS["beyond"](tmp_path)
    assert ("- **learned** (fitted in 12 s): vs searched, unconditional −0.50% [−0.80, −0.20] *better*; "
            "vs uniform, unconditional +0.10% [−0.20, +0.40] *not resolved*.") in text
    assert "took 40 s" in text and "9.0" not in text                                 # per-range rows left out
    assert "not compared in this reproduction" in text
    pd.DataFrame([{"comparison": "gradient vs equal", "kind": "merged", "condition": "unconditional",
                   "delta_pct": 0.3, "ci95_low": 0.1, "ci95_high": 0.5, "verdict": "worse"},
                  {"comparison": "gradient vs before finetuning", "kind": "merged", "condition": "unconditional",
                   "delta_pct": -1.0, "ci95_low": -1.2, "ci95_high": -0.8, "verdict": "better"}]
                 ).to_csv(tmp_path / "ranges_fmnist.csv", index=False)
    text = BLOCKS["beyond"](tmp_path)
    assert ("**Timestep ranges from the gradients** (gradient vs equal, equal budget): merged, unconditional "
            "+0.30% [+0.10, +0.50] *worse*.") in text
