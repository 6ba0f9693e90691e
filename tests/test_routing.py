"""casam.inference.routing.Routing: built from the router's raw result, gated per prompt type, written out as before."""

import json

from casam.inference.routing import PARAM_KEYS, Routing
from casam.model.router import Route
from casam.registry.store import LayerInfo

A = LayerInfo("a-v1", "A", 1, tau=2.0, extra={
    "use": {"box": True, "click": False},
    "val": {"box": {"layer": 0.8, "plain": 0.7}, "click": {"layer": 0.5, "plain": 0.6}}})
B = LayerInfo("b-v1", "B", 1, tau=1.0)


def test_decide_covers_routed_fallback_plain_and_named():
    routed = Routing.decide(Route(0, [1.5, 3.0], 0), [A, B])
    assert (routed.layer, routed.institution, routed.fallback, routed.forced, routed.score, routed.tau) \
        == ("a-v1", "A", False, False, 1.5, 2.0)
    assert routed.scores == {"a-v1": 1.5, "b-v1": 3.0}
    fell = Routing.decide(Route(None, [2.5, 3.0], 0), [A, B])
    assert fell.layer is None and fell.fallback and fell.nearest == "a-v1" and (fell.score, fell.tau) == (2.5, 2.0)
    empty = Routing.decide(Route(None, [], None), [])
    assert empty.fallback and empty.nearest is None and empty.score is None and empty.scores == {}
    plain = Routing.decide(Route(0, [1.5, 3.0], 0), [A, B], plain=True)
    assert plain.layer is None and plain.forced and not plain.fallback and plain.score is None
    named = Routing.decide(Route(0, [1.5, 3.0], 0), [A, B], forced=B)
    assert (named.layer, named.forced, named.score, named.tau) == ("b-v1", True, 3.0, 1.0)


def test_the_gate_and_the_json_keys_clients_read():
    routed = Routing.decide(Route(0, [1.5, 3.0], 0), [A, B])
    assert set(routed.to_dict()) == {"layer", "institution", "fallback", "forced", "score", "tau", "scores"}
    box, click = routed.gated("box", A), routed.gated("click", A)
    assert box.used == "a-v1" and "0.800 > 0.700" in box.reason
    assert click.used is None and "0.500 vs 0.600" in click.reason and click.prompt == "click"
    assert routed.gated("box", None).used == "a-v1"  # a layer no longer active: it decodes, as before
    assert Routing.decide(Route(0, [1.5], 0), [A], forced=A).gated("click", A).used == "a-v1"
    d = box.to_dict()
    assert list(d) == ["layer", "institution", "fallback", "forced", "score", "tau", "scores", "prompt", "used",
                       "reason"]
    assert json.loads(json.dumps(d)) == d
    fell = Routing.decide(Route(None, [2.5], 0), [A]).gated("box", None)
    assert fell.reason == "no layer fits this image: plain SAM" and fell.to_dict()["nearest"] == "a-v1"
    assert "click" in Routing(click={"proposal": "click"}).to_dict() and "click" not in d
    assert routed.to_dict(("layer", "fallback", "score", "tau")) \
        == {"layer": "a-v1", "fallback": False, "score": 1.5, "tau": 2.0}
    params = click.as_params()
    assert tuple(params) == tuple("layer_used" if k == "used" else k for k in PARAM_KEYS)
    assert params["layer_used"] is None and params["click"] is None and params["layer"] == "a-v1"
