"""Which layer serves an image and a prompt: the router's choice and the gate's, as one record.

:class:`Routing` is what :meth:`casam.inference.predictor.CASAMPredictor.route` returns and what every
:class:`~casam.inference.predictor.Prediction` carries. It is built in one place (:meth:`Routing.decide`, from the VAE
router's raw :class:`casam.model.router.Route`), the gate fills in ``prompt``, ``used`` and ``reason``
(:meth:`Routing.gated`), and it is written out in one place: :meth:`Routing.to_dict` for the command line, the
bundle's predictions.json and reports, :meth:`Routing.as_params` for MONAI Label's result params.

It is not :class:`casam.model.router.Route`: that one holds positions and raw scores of the router's entries; this
one names layers and institutions and says why a layer does or does not decode.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Dict, Optional, Sequence

from casam.model.router import Route
from casam.registry.store import LayerInfo

# MONAI Label result params, in this order; the gate's "used" is sent as "layer_used"
PARAM_KEYS = ("layer", "institution", "fallback", "forced", "prompt", "used", "reason", "click", "score", "tau",
              "scores")


def _fmt(v: Optional[float]) -> str:
    return "n/a" if v is None else f"{v:.3f}"


@dataclass(frozen=True)
class Routing:
    """The layer chosen for an image, and the layer that decodes one prompt on it.

    Attributes:
        layer: the chosen layer's name, or None (plain SAM).
        institution: its institution, or None.
        fallback: True when the router found no layer that fits (its best score is above that layer's τ).
        forced: True when the caller named the layer (or asked for plain SAM).
        score: the chosen layer's router score (on fallback: the nearest layer's), or None.
        tau: that layer's τ, or None.
        scores: every active layer's router score, by name.
        nearest: on fallback, the layer with the lowest score (None when there is none).
        prompt: ``box`` or ``click``, once gated (None before).
        used: the layer that decodes, None for plain SAM: the chosen layer is used only for prompt types it
            serves (:meth:`casam.registry.store.LayerInfo.serves`), a named one always.
        reason: why ``used`` decodes, in words.
        click: for clicks, the box proposal chosen (:func:`casam.prompts.clicks.decode_clicks`), else None.
    """

    layer: Optional[str] = None
    institution: Optional[str] = None
    fallback: bool = False
    forced: bool = False
    score: Optional[float] = None
    tau: Optional[float] = None
    scores: Dict[str, float] = field(default_factory=dict)
    nearest: Optional[str] = None
    prompt: Optional[str] = None
    used: Optional[str] = None
    reason: Optional[str] = None
    click: Optional[Dict[str, Any]] = None

    @classmethod
    def decide(cls, raw: Route, infos: Sequence[LayerInfo], forced: Optional[LayerInfo] = None,
               plain: bool = False) -> "Routing":
        """Builds the routing of an image.

        Args:
            raw: the VAE router's result for the image, over ``infos`` in order.
            infos: the active layers.
            forced: a layer the caller named (active or not); it is chosen whatever the router says.
            plain: the caller asked for plain SAM (ignored when ``forced`` is given).

        Returns:
            The routing, not yet gated.
        """
        scores = {i.name: round(float(s), 6) for i, s in zip(infos, raw.scores)}
        if forced is not None:
            return cls(forced.name, forced.institution, False, True, scores.get(forced.name), forced.tau, scores)
        if plain:
            return cls(None, None, False, True, None, None, scores)
        if raw.index is None:
            best = infos[raw.best] if raw.best is not None else None
            return cls(None, None, True, False, raw.scores[raw.best] if best else None, best.tau if best else None,
                       scores, nearest=best.name if best else None)
        info = infos[raw.index]
        return cls(info.name, info.institution, False, False, raw.scores[raw.index], info.tau, scores)

    def gated(self, prompt: str, info: Optional[LayerInfo]) -> "Routing":
        """The gate: whether the chosen layer decodes a prompt type.

        A named layer always decodes; a routed one only where it beat plain SAM on its validation split
        (:meth:`casam.registry.store.LayerInfo.serves`). The choice for the previous prompt, if any, is replaced.

        Args:
            prompt: ``box`` or ``click``.
            info: the chosen layer's LayerInfo, or None when it is unknown (then the layer decodes).

        Returns:
            A copy with ``prompt``, ``used`` and ``reason`` set and ``click`` cleared.
        """
        name = self.layer
        if name is None:
            why = "no layer fits this image: plain SAM" if self.fallback else "plain SAM requested"
            return replace(self, prompt=prompt, used=None, reason=why, click=None)
        if self.forced:
            return replace(self, prompt=prompt, used=name, reason=f"layer {name} requested", click=None)
        use, val = (info.serves(prompt), info.validation(prompt)) if info is not None else (True, {})
        lay, base = _fmt(val.get("layer")), _fmt(val.get("plain"))
        if use:
            why = f"{name} beat plain SAM on {prompt} prompts in validation ({lay} > {base})"
        else:
            why = f"{name} did not beat plain SAM on {prompt} prompts in validation ({lay} vs {base}): plain SAM"
        return replace(self, prompt=prompt, used=name if use else None, reason=why, click=None)

    def to_dict(self, keys: Optional[Sequence[str]] = None) -> Dict[str, Any]:
        """The routing as JSON.

        Args:
            keys: keep only these (those present); None: all.

        Returns:
            ``layer``, ``institution``, ``fallback``, ``forced``, ``score``, ``tau`` and ``scores``; ``nearest`` on
            fallback; ``prompt``, ``used`` and ``reason`` once gated; ``click`` for clicks.
        """
        d: Dict[str, Any] = {"layer": self.layer, "institution": self.institution, "fallback": self.fallback,
                             "forced": self.forced, "score": self.score, "tau": self.tau, "scores": dict(self.scores)}
        if self.fallback:
            d["nearest"] = self.nearest
        if self.prompt is not None:
            d.update(prompt=self.prompt, used=self.used, reason=self.reason)
        if self.click is not None:
            d["click"] = self.click
        return d if keys is None else {k: v for k, v in d.items() if k in keys}

    def as_params(self) -> Dict[str, Any]:
        """The routing as MONAI Label result params.

        Returns:
            Every key of :data:`PARAM_KEYS` in that order (None where unset), ``used`` named ``layer_used``.
        """
        d = self.to_dict()
        return {("layer_used" if k == "used" else k): d.get(k) for k in PARAM_KEYS}
