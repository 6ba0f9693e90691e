"""The continual stream benchmark: a --quick run (tiny backbone, 2 real tasks, 1 epoch) and its outputs."""

from __future__ import annotations

import json

import pytest

from casam.evaluation.benchmark import build_parser, main
from casam.evaluation.stages import METHODS
from conftest import DATA, needs_data


def test_help_lists_the_flags(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--epochs", "--max-images", "--data", "--tasks", "--out", "--cache", "--methods", "--quick", "--full"):
        assert flag in text


def test_cli_passes_options_to_the_benchmark(capsys):
    from casam.cli import main as cli_main

    with pytest.raises(SystemExit) as e:
        cli_main(["benchmark", "--help"])
    assert e.value.code == 0
    assert "--max-images" in capsys.readouterr().out


def test_quick_and_full_are_exclusive():
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--quick", "--full"])


@needs_data
def test_quick_run_writes_results(tmp_path):
    argv = ["--quick", "--out", str(tmp_path), "--data", str(DATA), "--methods", ",".join(METHODS), "--clicks", "2"]
    assert main(argv) == 0
    res = json.loads((tmp_path / "continual.json").read_text())
    assert (tmp_path / "continual.md").read_text().startswith("# Continual stream benchmark")
    assert (tmp_path / "continual_R.png").stat().st_size > 1000
    assert (tmp_path / "continual_clicks.png").stat().st_size > 1000  # the per-task interaction curves

    T = len(res["tasks"])
    assert T == 2 and res["backbone"]["name"] == "tiny" and res["partial"] is False
    for key in ("backbone", "tasks", "router", "layer", "machine", "command", "seconds", "recipe", "targets",
                "methods"):
        assert key in res
    assert set(res["methods"]) == set(METHODS)
    for name, m in res["methods"].items():
        for key in ("R", "R_click", "R_dice", "R_biou", "R_all"):
            assert [len(r) for r in m[key]] == ([1, 2] if key != "R_all" else [2, 2]), (name, key)
            assert all(v is None or 0.0 <= v <= 1.0 for row in m[key] for v in row)
        assert 0.0 <= m["avg_iou"] <= 1.0 and 0.0 <= m["avg_iou_click"] <= 1.0
        assert m["avg_iou"] == pytest.approx(sum(m["R"][-1]) / T, abs=1e-5)
        if name == "joint":
            assert m["bwt"] is None
        else:
            assert m["bwt"] == pytest.approx(m["R"][1][0] - m["R"][0][0], abs=1e-5)
    # no training: zero-shot rows repeat; the oracle keeps each task's score once learned (layers never change)
    zs, orc = res["methods"]["zero_shot"]["R"], res["methods"]["casam_oracle"]["R"]
    assert zs[1][0] == zs[0][0]
    assert orc[1][0] == orc[0][0] and res["methods"]["casam_oracle"]["bwt"] == 0.0

    r = res["router"]
    assert 0.0 <= r["accuracy"] <= 1.0 and 0.0 <= r["fallback_rate"] <= 1.0
    assert set(r["confusion"]) == set(res["tasks"])
    assert r["confusion_columns"] == res["tasks"] + ["fallback"]
    n_test = sum(t["test_cases"] for t in res["task_data"])
    assert sum(sum(row.values()) for row in r["confusion"].values()) == r["n_images"] == n_test
    assert len(r["per_step"]) == T
    for step in r["per_step"]:
        assert {"box", "click"} <= set(step["use"]) <= {"box", "click", "corrections"}
        assert step["seconds_to_serve"]["total"] > 0
        st = step["seconds_to_serve"]  # every stage before the layer is served counts, the gate's click validation too
        assert st["validate"] >= 0 and st["after_encode"] >= st["train"] + st["calibrate"] + st["validate"] - 0.3
        assert st["total"] == pytest.approx(st["encode"] + st["after_encode"], abs=0.11)
        assert step["val"]["box"]["plain"] is not None and step["best_epoch"] in (0, 1)
    assert r["per_step"][0]["new_modality_fallback_rate"] is not None  # MRI is new after dermoscopy
    assert r["per_step"][1]["seen_modality_total"] == sum(t["test_cases"] for t in res["task_data"])
    assert 0 <= r["other_modality_layer_max"] <= r["per_step"][1]["seen_modality_total"]
    mods = {t["modality"] for t in res["task_data"]}
    assert set(r["modality_confusion"]) == mods
    assert sum(sum(v.values()) for v in r["modality_confusion"].values()) == r["n_images"]
    assert set(r["regret"]) == {"box", "click"}
    # a fresh install answers boxes exactly as plain SAM does
    assert res["methods"]["fresh_install"]["R"][-1] == res["methods"]["zero_shot"]["R"][-1]
    seqs = res["click_sequences"]  # box or centre click first, then --clicks 2 corrective clicks: 3 answers
    assert set(seqs) == {"box", "click"}
    for protocol in seqs.values():
        assert set(protocol) == {"zero_shot", "fresh_install", "casam", "casam_oracle"}
        for v in protocol.values():
            mean = v["mean"]
            assert len(mean["iou"]) == len(mean["dice"]) == len(mean["seconds"]) == 3
            assert mean["auc_iou"] is not None and isinstance(mean["monotone"], bool)
            assert 1 <= mean["noc80"] <= mean["noc90"] <= 4 and all(x >= 0 for x in mean["seconds"])
            assert set(v["per_task"]) == set(res["tasks"])
            for s in v["per_task"].values():
                assert len(s["iou"]) == len(s["seconds"]) == 3 and 1 <= s["noc80"] <= s["noc90"] <= 4
    md = (tmp_path / "continual.md").read_text()
    assert "tight box first" in md and "centre click first" in md and "NoC@90" in md
    assert res["layer"]["params"] == 3541008 and res["layer"]["gmac"] > 0
    assert res["recipe"]["epochs"] == 1 and "quick" in res["recipe"]["kind"]
    assert set(res["targets"]) == {"casam_box_vs_zero_shot", "casam_box_per_task", "casam_click", "fresh_install_click",
                                   "fresh_install_box", "router_regret_box", "router_regret_click", "casam_bwt",
                                   "new_modality_fallback", "no_cross_modality_route", "casam_box_hard_task",
                                   "seconds_to_serve", "casam_sequence_never_worse", "casam_sequence_monotone_box",
                                   "casam_sequence_monotone_click", "casam_clicks_hard_task", "casam_clicks_never_lose",
                                   "casam_sequence"}
    assert all(t["met"] in (True, False) for t in res["targets"].values())
    assert res["machine"]["torch"] and res["command"].startswith("casam benchmark --quick")


@needs_data
def test_task_and_method_subsets(tmp_path):
    assert main(["--quick", "--out", str(tmp_path), "--data", str(DATA), "--tasks", "dermoscopy_ph2",
                 "--methods", "zero_shot,casam", "--max-test-cases", "2", "--no-plot", "--clicks", "0"]) == 0
    res = json.loads((tmp_path / "continual.json").read_text())
    assert res["tasks"] == ["dermoscopy_ph2"] and set(res["methods"]) == {"zero_shot", "casam"}
    assert res["methods"]["casam"]["bwt"] == 0.0 and len(res["methods"]["casam"]["R"]) == 1
    assert not (tmp_path / "continual_R.png").exists() and not (tmp_path / "continual_clicks.png").exists()
    assert res["click_sequences"] == {}


def test_click_targets_promise_what_plain_sam_can_do_and_a_task_it_fails_at_has_its_own():
    from casam.evaluation.results import targets

    def method(box, click):
        return {"R": [box], "R_click": [click], "avg_iou": sum(box) / len(box),
                "avg_iou_click": sum(click) / len(click)}

    methods = {"zero_shot": method([0.9, 0.13], [0.0, 0.0]), "fresh_install": method([0.9, 0.13], [0.8, 0.09]),
               "casam": method([0.9, 0.61], [0.82, 0.6])}
    t = targets(methods, {}, {})
    assert t["casam_click"]["value"] == pytest.approx(0.82) and t["casam_click"]["met"] is True
    assert t["casam_click"]["all_tasks"] == pytest.approx(0.71) and "plain SAM does" in t["casam_click"]["target"]
    assert t["fresh_install_click"]["value"] == pytest.approx(0.8) and t["fresh_install_click"]["met"] is True
    assert t["casam_box_hard_task"]["value"] == pytest.approx(0.61) and t["casam_box_hard_task"]["met"] is True
    assert t["casam_sequence"]["value"] is None and t["casam_sequence"]["met"] is None  # before the sequences
    methods["casam"]["R"] = [[0.9, 0.5]]
    assert targets(methods, {}, {})["casam_box_hard_task"]["met"] is False
    easy = {m: method(v["R"][0][:1], v["R_click"][0][:1]) for m, v in methods.items()}  # no hard task: as before
    t = targets(easy, {}, {})
    assert t["casam_click"]["target"] == "CA-SAM click Avg-IoU >= 0.8" and t["casam_box_hard_task"]["value"] is None


def sequence_results(casam, fresh):
    """Click-sequence results of CA-SAM and a fresh install: protocol → method → per-task IoU after each step."""
    def method(per_task):
        return {"per_task": {task: {"iou": iou, "n": 4} for task, iou in per_task.items()},
                "mean": {"iou": [sum(x) / len(x) for x in zip(*per_task.values())]}}

    return {p: {"casam": method(casam[p]), "fresh_install": method(fresh[p])} for p in ("box", "click")}


def test_sequence_targets_hold_casam_to_a_fresh_install_and_to_its_own_first_answer():
    from casam.evaluation.results import targets

    def method(box):
        return {"R": [box], "R_click": [box], "avg_iou": sum(box) / len(box), "avg_iou_click": sum(box) / len(box)}

    methods = {"zero_shot": method([0.9, 0.13]), "fresh_install": method([0.9, 0.13]), "casam": method([0.9, 0.6])}
    casam = {"box": {"easy": [0.9, 0.93, 0.95], "vessels": [0.6, 0.64, 0.7]},
             "click": {"easy": [0.8, 0.9, 0.92], "vessels": [0.4, 0.5, 0.55]}}
    fresh = {"box": {"easy": [0.9, 0.932, 0.94], "vessels": [0.13, 0.2, 0.25]},
             "click": {"easy": [0.8, 0.88, 0.9], "vessels": [0.1, 0.15, 0.2]}}
    t = targets(methods, {}, sequence_results(casam, fresh))
    w = t["casam_sequence_never_worse"]  # 0.93 after the first click on easy, a fresh install 0.932: within 0.005
    assert w["value"] == pytest.approx(-0.002) and w["met"] is True and w["where"] == "easy, box first, click 1"
    assert t["casam_sequence_monotone_box"]["value"] == 0.0 and t["casam_sequence_monotone_box"]["met"] is True
    assert t["casam_sequence_monotone_click"]["tasks_falling"] == 0
    hard = t["casam_clicks_hard_task"]  # vessels: box 0.6, after 2 clicks 0.7
    assert hard["value"] == pytest.approx(0.1) and hard["met"] is True and hard["where"] == "vessels"
    assert "the box and 2 clicks" in hard["target"]
    lose = t["casam_clicks_never_lose"]
    assert lose["value"] == pytest.approx(0.05) and lose["met"] is True and lose["where"] == "easy, box first"
    seq = t["casam_sequence"]  # the box and the clicks, on the task plain SAM does
    assert seq["value"] == pytest.approx(0.95) and seq["met"] is True and seq["all_tasks"] == pytest.approx(0.825)
    assert "plain SAM does" in seq["target"]

    casam["box"]["easy"] = [0.9, 0.89, 0.88]  # the clicks make it worse than its box, and worse than a fresh install
    casam["click"]["vessels"] = [0.4, 0.45, 0.42]
    t = targets(methods, {}, sequence_results(casam, fresh))
    assert t["casam_sequence_never_worse"]["value"] == pytest.approx(-0.06)
    assert t["casam_sequence_never_worse"]["met"] is False
    assert t["casam_sequence_never_worse"]["where"] == "easy, box first, click 2"
    mono = t["casam_sequence_monotone_box"]  # mean box curve 0.75, 0.765, 0.79: rises; easy's own falls
    assert mono["met"] is True and mono["tasks_falling"] == 1
    mono = t["casam_sequence_monotone_click"]  # mean click curve 0.6, 0.675, 0.67: falls by 0.005
    assert mono["value"] == pytest.approx(0.005) and mono["met"] is False and mono["tasks_falling"] == 1
    assert t["casam_clicks_never_lose"]["value"] == pytest.approx(-0.02)
    assert t["casam_clicks_never_lose"]["met"] is False
    assert t["casam_sequence"]["value"] == pytest.approx(0.88) and t["casam_sequence"]["met"] is False
