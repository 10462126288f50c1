"""`sdstack eval` (sdstack/eval/cli.py) on a tiny random model: runs every suite and writes its report."""

import json

from click.testing import CliRunner

from sdstack.eval.cli import eval_command, run_eval
from sdstack.eval.suites import SUITE_NAMES
from sdstack.models.tiny import save_diffusers_folder, tiny_bundle


def test_eval_scores_every_suite_and_writes_reports(tmp_path):
    model = save_diffusers_folder(tiny_bundle("sd1"), tmp_path / "tiny")
    summaries = run_eval(model, list(SUITE_NAMES), seeds=2, limit=1, out=tmp_path / "report",
                         gen={"steps": 2})
    assert [s["suite"] for s in summaries] == list(SUITE_NAMES)
    assert all(s["n_images"] == 2 and 0.0 <= s["accuracy"] <= 1.0 for s in summaries)
    assert {r["seed"] for r in summaries[0]["results"]} == {0, 1}
    saved = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert saved[0]["settings"] == {"steps": 2, "seeds": 2}
    assert (tmp_path / "report" / "single.png").is_file()


def test_eval_command_prints_the_overview(tmp_path):
    model = save_diffusers_folder(tiny_bundle("sd1"), tmp_path / "tiny")
    result = CliRunner().invoke(eval_command, ["--model", str(model), "--suite", "single", "--seeds", "1",
                                               "--limit", "1", "--steps", "1"])
    assert result.exit_code == 0, result.output
    assert "suite single" in result.output and "mean" in result.output
