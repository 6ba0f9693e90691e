"""casam evaluate: per-task IoU/Dice of box and click prompts, routed vs plain SAM vs fresh install."""

from __future__ import annotations

import json

from casam.cli import main
from conftest import DATA, needs_data


@needs_data
def test_evaluate_writes_a_table_json_and_markdown(tmp_path, capsys):
    out = tmp_path / "ev"
    rc = main(["evaluate", str(DATA / "dermoscopy_ph2"), "--backbone", "tiny", "--max-images", "2",
               "--registry", str(tmp_path / "reg"), "--out", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "dermoscopy_ph2" in text and "click:routed" in text
    res = json.loads((out / "evaluate.json").read_text())
    (task,) = res["tasks"].values()
    assert task["images"] == 2 and task["masks"] >= 2 and task["routes"] == {"fallback": 2}
    assert task["fallback_rate"] == 1.0 and task["used"]["box"] == {"plain SAM": task["masks"]}
    for way in ("routed", "plain", "fresh"):
        for prompt in ("box", "click"):
            assert 0.0 <= task["scores"][way][prompt]["iou"] <= 1.0 and task["scores"][way][prompt]["dice"] is not None
    # an empty registry: the product is plain SAM for boxes and a fresh install for clicks
    assert task["scores"]["routed"]["box"] == task["scores"]["plain"]["box"] == task["scores"]["fresh"]["box"]
    assert task["scores"]["routed"]["click"] == task["scores"]["fresh"]["click"]
    assert (out / "evaluate.md").read_text().startswith("# casam evaluate: dermoscopy_ph2")


def test_evaluate_refuses_a_folder_without_labels(tmp_path):
    (tmp_path / "images").mkdir()
    assert main(["evaluate", str(tmp_path), "--backbone", "tiny", "--registry", str(tmp_path / "reg"),
                 "--out", str(tmp_path / "ev")]) == 2
