"""The results pages are regenerated from the studies' committed exports (tuning/pages.py): every
generated block of docs/results/*.md equals what its export gives, and the views compute what they
say (checked by hand on a made-up study)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tuning.export import RunData, Study, load_study
from tuning.pages import regenerate

ROOT = Path(__file__).resolve().parents[1]
NOT_EXPORTED = "*Not yet from a committed export*"
RESULTS = ROOT / "docs" / "results"
DROPS = {("darts", "[2, 2, 2, 2]"): [30.0, 31.0, 32.0], ("da2s", "[2, 2, 2, 2]"): [1.0, 2.0, 3.0],
         ("da2s", "4 of 14"): [10.0, 12.0, 14.0]}  # fmt: skip


def made_up_export(path: Path) -> Path:
    """Three groups of three searches with the drops above (supernet 40 %), written as an export."""
    trials = []
    for (method, target), drops in DROPS.items():
        for seed, drop in enumerate(drops, start=1):
            curves = {"architecture/skip_connect_normal": [[1, 1.0], [2, float(seed)]]}
            trials.append({
                "run_id": f"{method}-{target}-{seed}", "name": f"{method}-{seed}", "status": "FINISHED",
                "params": {"method": method, "target": target, "seed": str(seed), "ops": method, "model.nodes": "4"},
                "tags": {"kind": "trial", "environment.python": "3.11.7", "environment.torch": "2.14.1"},
                "metrics": {"supernet_acc": 40.0, "discretized_acc": 40.0 - drop, "drop": drop, "drop_bn_recal": drop},
                "curves": curves,
            })  # fmt: skip
    path.write_text(json.dumps({"format": 1, "experiment": "made_up", "trials": trials, "evaluations": []}))
    return path


PAGE = """# A page

<!-- generated: made_up summary -->
<!-- end generated -->
Prose between blocks stays.
<!-- generated: made_up table4 -->
<!-- end generated -->
<!-- generated: made_up differences base="darts|[2, 2, 2, 2]" -->
<!-- end generated -->
<!-- generated: made_up kinds method=da2s -->
<!-- end generated -->
<!-- generated: made_up correlation method=da2s x=drop y=discretized_acc -->
<!-- end generated -->
<!-- generated: made_up skips -->
<!-- end generated -->
<!-- generated: made_up environment -->
<!-- end generated -->
<!-- generated: made_up figure what=drops -->
<!-- end generated -->
"""


def test_views_compute_what_they_say(tmp_path):
    (tmp_path / "data").mkdir()
    made_up_export(tmp_path / "data" / "made_up.json")
    page = tmp_path / "page.md"
    page.write_text(PAGE)
    assert len(regenerate(page, tmp_path / "data")) == 8
    text = page.read_text()
    assert "Prose between blocks stays." in text and "9 finished trials" in text
    # darts [2, 2, 2, 2]: drops 30, 31, 32 -> 31.00 ± 1.00 (sample std); supernet 40.00 ± 0.00
    assert "| [2, 2, 2, 2] | 40.00 ± 0.00 | 9.00 ± 1.00 | 31.00 ± 1.00 | 31.00 ± 1.00 |" in text
    # da2s [2, 2, 2, 2] against darts: -29.00; the 20 splits of 3 + 3 give |diff| >= 29 twice: p = 0.1
    assert "| da2s | [2, 2, 2, 2] | 3 | 2.00 | -29.00 [" in text and "| 0.1 |" in text
    # per cell (10, 12, 14) against per node (1, 2, 3): +10.00, the two extreme splits of 20: p = 0.1
    assert "per-cell targets 12.00 (range 10.00 to 14.00, n = 3), per-node targets 2.00" in text
    assert "difference +10.00, 95 % interval [" in text and "permutation p = 0.1 (n = 3 and 3)" in text
    # discretized = 40 - drop: rho = -1; of the 6! orderings two reach |rho| = 1 (p = 2/720), of 3! two (p = 1/3)
    assert "every target: ρ = -1.00, p = 0.00278 (n = 6); per-cell targets: ρ = -1.00, p = 0.333 (n = 3)." in text
    # skip_connect at the last epoch: the seeds' counts 1, 2, 3 -> 2.0, per method
    assert "| darts | 2.0 |" in text and "| da2s | 2.0 |" in text
    assert "Environment: python 3.11.7, torch 2.14.1." in text
    assert "![accuracy drops](page/drops.png)" in text and (tmp_path / "page" / "drops.png").stat().st_size > 1000
    # A page whose numbers no longer match its data: --check names the block and writes nothing.
    page.write_text(text.replace("31.00 ± 1.00", "30.00 ± 1.00", 1))
    assert regenerate(page, tmp_path / "data", check=True) == ["made_up table4"]
    assert "30.00 ± 1.00" in page.read_text()
    assert regenerate(page, tmp_path / "data") == ["made_up table4"] and regenerate(page, tmp_path / "data") == []


def test_an_export_reads_back_as_the_same_study(tmp_path):
    study = load_study(made_up_export(tmp_path / "made_up.json"))
    assert isinstance(study, Study) and len(study.trials) == 9 and study.evaluations == []
    first = study.trials[0]
    assert isinstance(first, RunData) and first.curves["architecture/skip_connect_normal"] == [(1, 1.0), (2, 1.0)]
    (tmp_path / "old.json").write_text(json.dumps({"format": 0, "experiment": "x", "trials": [], "evaluations": []}))
    with pytest.raises(ValueError, match="format 0"):
        load_study(tmp_path / "old.json")


@pytest.mark.skipif(not (RESULTS / "data").is_dir(), reason="no committed exports yet")
def test_every_results_page_is_its_data():
    """The regeneration of docs/results from docs/results/data changes nothing (the command a reader runs)."""
    done = subprocess.run(
        [sys.executable, str(ROOT / "sweeps" / "report.py"), "--regenerate", "--check"], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert "0 generated blocks differ" in done.stderr
    pages = sorted(RESULTS.glob("*.md"))
    # A page not (yet) generated from an export says so at its top, where a reader starts.
    assert pages and all("<!-- generated:" in p.read_text() or NOT_EXPORTED in p.read_text()[:600] for p in pages)
