import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from casam.cli import main
from casam.data.datasets import discover_tasks, read_image, read_mask, spread, stream_order
from casam.errors import ImageError
from conftest import DATA, needs_data


def _write_folder(root: Path, data, institution="Site A"):
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rows = ["case,patient,institution,split,classes_present"]
    for i, (img, m) in enumerate(data):
        Image.fromarray(img).save(root / "images" / f"c{i}.png")
        Image.fromarray(m).save(root / "masks" / f"c{i}.png")
        rows.append(f"c{i},p{i // 2},{institution},{'test' if i >= len(data) - 2 else 'train'},1")
    (root / "meta.csv").write_text("\n".join(rows) + "\n")


def test_discover_tasks_follows_readme_order(tmp_path, disks):
    _write_folder(tmp_path / "alpha", disks["A"][:4], "X")
    _write_folder(tmp_path / "beta", disks["B"][:4], "Y")
    (tmp_path / "MANIFEST.tsv").write_text("task\tmodality\nalpha\tMR\nbeta\tCT\n")
    (tmp_path / "README.md").write_text("Stream:\n1. beta\n2. alpha @ X\n")
    assert stream_order(tmp_path) == [("beta", None), ("alpha", "X")]
    tasks = discover_tasks(tmp_path)
    assert [t.name for t in tasks] == ["beta", "alpha"] and tasks[1].modality == "MR"
    assert len(tasks[0].split("train")) == 2 and len(tasks[0].split("test")) == 2


@needs_data
def test_real_data_tasks():
    tasks = discover_tasks(DATA)
    assert len(tasks) >= 5
    for t in tasks:
        assert t.split("train") and t.split("test")
        tr = {c.patient for c in t.split("train")}
        assert not tr & {c.patient for c in t.split("test")}


def test_read_errors(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG not really")
    with pytest.raises(ImageError):
        read_image(bad)
    with pytest.raises(ImageError):
        read_image(tmp_path / "missing.png")
    Image.fromarray(np.dstack([np.zeros((4, 4)), np.ones((4, 4)), np.zeros((4, 4))]).astype(np.uint8)).save(
        tmp_path / "rgb.png"
    )
    with pytest.raises(ImageError, match="colour"):
        read_mask(tmp_path / "rgb.png")


def test_cli_add_list_predict_rollback(tmp_path, disks, capsys):
    _write_folder(tmp_path / "site", disks["A"], "Site A")
    reg = str(tmp_path / "reg")
    common = ["--backbone", "tiny", "--registry", reg]
    assert main(["add-layer", str(tmp_path / "site"), "--epochs", "1", "--cache", str(tmp_path / "c"), *common]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["name"] == "site-a-v1" and line["institution"] == "Site A"
    assert main(["layers", "list", "--json", "--registry", reg]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["name"] == "site-a-v1" and rows[0]["active"]
    out = tmp_path / "m.png"
    image = str(tmp_path / "site" / "images" / "c0.png")
    box = ["--box", "5", "5", "40", "30"]
    assert main(["predict", image, *box, "--layer", "site-a-v1", "--out", str(out), *common]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["route"]["layer"] == "site-a-v1" and Image.open(out).size == (64, 48)
    assert main(["predict", str(tmp_path / "site" / "images" / "c0.png"), "--point", "500", "5", *common]) == 2
    assert "outside the image" in capsys.readouterr().err
    assert main(["layers", "rollback", "Site A", "--registry", reg]) == 0
    assert main(["layers", "remove", "nope", "--registry", reg]) == 2


def test_console_script_help():
    exe = Path(sys.executable).parent / "casam"
    for args in ([], ["add-layer"], ["predict"], ["layers"], ["export-bundle"], ["demo"]):
        r = subprocess.run([str(exe), *args, "--help"], capture_output=True, text=True)
        assert r.returncode == 0 and "usage: casam" in r.stdout, r.stderr


def test_spread_keeps_at_most_n_evenly_from_first_to_last():
    cases = list("abcdefghij")
    assert spread(cases, None) == cases and spread(cases, 10) == cases and spread(cases, 50) == cases
    assert spread(cases, 3) == ["a", "e", "j"]  # first, middle (index 4.5 rounds to even), last
    assert spread(cases, 1) == ["a"] and spread(cases, 0) == [] and spread([], 4) == []
    assert spread(range(5), 2) == [0, 4]
