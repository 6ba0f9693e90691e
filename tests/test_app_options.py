"""The app's ``--conf`` options are listed once (``apps/casam/lib/configs/options.py``).

No server: the README's table is the list's, the app reads no ``--conf`` key that is not in the list and uses
every one that is, and the app's one yes/no parser answers as MONAI Label's ``strtobool``.
"""

from __future__ import annotations

import re

import pytest

from mlserver import APP

pytest.importorskip("monailabel")
import lib.configs.casam as app_config  # noqa: E402
from lib.configs.options import BY_NAME, OPTIONS, README, flag, markdown_table, read_options, with_table  # noqa: E402

# a key read from the options: conf.get("key" / conf["key"] (also self.conf) and opts["key"] (read_options' answer)
READS = re.compile(r"""\b(?:conf\.get\(|conf\[|opts\[)\s*["'](\w+)["']""")


class Recording(dict):
    """A dict that remembers the keys read from it."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.read = set()

    def get(self, key, default=None):
        self.read.add(key)
        return super().get(key, default)

    def __getitem__(self, key):
        self.read.add(key)
        return super().__getitem__(key)


def test_readme_table_is_the_list():
    text = README.read_text()
    assert with_table(text) == text, "apps/casam/README.md's options table is stale: run " \
                                     "'cd apps/casam && python -m lib.configs.options --write'"
    assert len({o.name for o in OPTIONS}) == len(OPTIONS)
    for o in OPTIONS:
        assert o.help and "\n" not in o.help, o.name
        assert f"| `{o.name}` | {o.default_text()} |" in markdown_table()


def test_the_app_reads_only_listed_options_and_uses_every_one(tmp_path, monkeypatch):
    conf = Recording(backbone="tiny", registry=str(tmp_path / "registry"), cache=str(tmp_path / "cache"))
    used = {}

    def recording_read_options(c):
        used["opts"] = Recording(read_options(c))
        return used["opts"]

    monkeypatch.setattr(app_config, "with_conf_file", lambda c: c)  # keep the recording dict
    monkeypatch.setattr(app_config, "read_options", recording_read_options)
    cfg = app_config.CASAMConfig()
    cfg.init("casam", str(tmp_path / "model"), conf, None)
    assert conf.read <= set(BY_NAME), f"--conf keys read but not in lib/configs/options.py: {conf.read - set(BY_NAME)}"
    unused = set(BY_NAME) - used["opts"].read - {"conf_file"}  # conf_file is read by lib/server/conffile.py
    assert not unused, f"options listed but not used by CASAMConfig: {unused}"
    # and in the source: every conf.get("…") / conf["…"] / opts["…"] of the app names a listed option
    for path in sorted(APP.rglob("*.py")):
        for key in READS.findall(path.read_text()):
            assert key in BY_NAME, f"{path.relative_to(APP)} reads --conf {key!r}, which lib/configs/options.py lacks"


def test_defaults_are_the_lists(tmp_path):
    cfg = app_config.CASAMConfig()
    cfg.init("casam", str(tmp_path / "model"), {"registry": str(tmp_path / "registry")}, None)
    for name in ("min_images", "retrain_after", "train_after_labels", "train_threads", "train_nice", "max_train_epochs",
                 "max_train_images", "max_train_minutes", "max_slices_per_volume", "cache_mb", "decode_cache_mb",
                 "prefetch", "novelty_max_score", "click_budget_s", "expose_logs", "max_points",
                 "max_propagation_slices", "max_concurrent_infers", "max_sessions", "default_institution"):
        assert getattr(cfg, name) == BY_NAME[name].default, name
    assert cfg.backbone_name == "litemedsam" and cfg.cache_size is None and cfg.labels == {"object": 1}
    assert (cfg.train_config.epochs, cfg.train_config.head_steps, cfg.train_config.max_images) == (24, 150, None)
    assert cfg.registry_dir == tmp_path / "registry" and cfg.cache_dir == tmp_path / "model" / "cache"
    assert cfg.device in ("cpu", "cuda")  # auto, resolved


def test_one_yes_no_parser():
    for yes in (True, "true", "YES", " on ", "1", "y", "t"):
        assert flag(yes) is True and flag(yes, default=None) is True, yes
    for no in (False, "false", "No", "off", "0", "n"):
        assert flag(no, default=True) is False, no
    for absent in (None, "", "  "):
        assert flag(absent) is False and flag(absent, default=True) is True, absent
    for neither in ("maybe", "2", 2, 1.0, [1]):
        with pytest.raises(ValueError, match="neither yes nor no"):
            flag(neither)
    assert read_options({"prefetch": "maybe", "expose_logs": "on"})["prefetch"] is True  # unreadable: the default
    assert read_options({"expose_logs": "on"})["expose_logs"] is True


def test_numbers_are_checked_and_raised_to_their_minimum():
    with pytest.raises(ValueError, match=r"--conf min_images must be an integer, got 'x'"):
        read_options({"min_images": "x"})
    with pytest.raises(ValueError, match=r"--conf cache_mb must be a number, got 'big'"):
        read_options({"cache_mb": "big"})
    opts = read_options({"train_after_labels": "-3", "max_concurrent_infers": "0", "max_train_minutes": "-1"})
    assert (opts["train_after_labels"], opts["max_concurrent_infers"], opts["max_train_minutes"]) == (0, 1, 0.0)
