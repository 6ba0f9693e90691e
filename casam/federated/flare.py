"""NVFlare components: the coordinator's controller and the site's executor.

Each round the :class:`CasamCoordinator` broadcasts the ``casam_train`` task (the merged registry's manifest, the
backbone hash, the training recipe, the minimum number of labels), checks and merges what comes back
(:func:`casam.federated.coordinator.merge`), then broadcasts ``casam_sync`` with the merged registry, which each
:class:`CasamSiteExecutor` copies into the registry its MONAI Label app serves. Every round is appended to a JSON
report beside the coordinator's registry; every answer a site sends is described in a JSON-lines outbox log at
the site.

Constructor arguments are plain values (paths, names, numbers), so NVFlare's job API can write them into the
job's config files; left empty, a site reads its settings from its environment (see :mod:`casam.paths`).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Dict, Optional

from nvflare.apis.controller_spec import Task
from nvflare.apis.executor import Executor
from nvflare.apis.fl_constant import ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.impl.controller import Controller
from nvflare.apis.shareable import ReservedHeaderKey, Shareable, make_reply
from nvflare.apis.signal import Signal
from nvflare.fuel.utils import fobs

from casam.federated import coordinator as coord
from casam.federated.coordinator import FED_MAX_VAL_DROP, FED_MIN_LABELS
from casam.federated.payload import describe
from casam.federated.site import sync, train_round
from casam.model.backbone import DEFAULT_BACKBONE
from casam.paths import default_cache, default_registry
from casam.registry.store import LayerRegistry

TRAIN_TASK = "casam_train"
SYNC_TASK = "casam_sync"
REPORT_FILE = "federated/rounds.json"
OUTBOX_FILE = "federated/outbox.jsonl"


def _plain(s: Shareable) -> Dict[str, Any]:
    """A Shareable's content without NVFlare's own headers."""
    return {k: v for k, v in s.items() if k != ReservedHeaderKey.HEADERS}


def _shareable(d: Dict[str, Any]) -> Shareable:
    s = Shareable()
    s.update(d)
    return s


def _load_backbone(name: str, checkpoint: str):
    from casam.model.backbone import load_backbone

    return load_backbone(name or DEFAULT_BACKBONE, checkpoint or None, "cpu")


class CasamCoordinator(Controller):
    """The coordinator: sends the manifest, checks and merges returned layers, sends the merged registry back.

    Args:
        registry: the merged registry folder (default ``$CASAM_REGISTRY``).
        backbone, checkpoint: the consortium's backbone (its hash is what every layer must carry).
        num_rounds: rounds to run.
        recipe: TrainConfig fields every site trains with (default: CA-SAM's recipe).
        min_labels: labelled images a site needs to train.
        max_val_drop: validation IoU a layer may lose against plain SAM, per prompt type, and still merge.
        train_timeout: seconds a round waits for the sites (0 = no limit).
    """

    def __init__(self, registry: str = "", backbone: str = DEFAULT_BACKBONE, checkpoint: str = "",
                 num_rounds: int = 1, recipe: Optional[dict] = None, min_labels: int = FED_MIN_LABELS,
                 max_val_drop: float = FED_MAX_VAL_DROP, train_timeout: int = 0):
        super().__init__()
        self.registry = registry
        self.backbone = backbone
        self.checkpoint = checkpoint
        self.num_rounds = int(num_rounds)
        self.recipe = dict(recipe or {})
        self.min_labels = int(min_labels)
        self.max_val_drop = float(max_val_drop)
        self.train_timeout = int(train_timeout)
        self._reg: Optional[LayerRegistry] = None
        self._backbone_hash = ""
        self._held: Dict[str, set] = {}  # site -> layer names it acknowledged holding

    def start_controller(self, fl_ctx: FLContext) -> None:
        self._reg = LayerRegistry(self.registry or default_registry())
        self._backbone_hash = _load_backbone(self.backbone, self.checkpoint).hash
        self.log_info(fl_ctx, f"casam coordinator: registry {self._reg.root}, backbone {self.backbone} "
                              f"({self._backbone_hash[:12]})")

    def stop_controller(self, fl_ctx: FLContext) -> None:
        pass

    def process_result_of_unknown_task(self, client, task_name: str, client_task_id: str, result: Shareable,
                                       fl_ctx: FLContext) -> None:
        self.log_warning(fl_ctx, f"ignored a late result of {task_name} from {client.name}")

    def control_flow(self, abort_signal: Signal, fl_ctx: FLContext) -> None:
        for r in range(self.num_rounds):
            if abort_signal.triggered:
                return
            self._round(r, abort_signal, fl_ctx)

    def _broadcast(self, name: str, data: Dict[str, Any], timeout: int, abort_signal: Signal, fl_ctx: FLContext):
        task = Task(name=name, data=_shareable(data), timeout=timeout)
        self.broadcast_and_wait(task=task, fl_ctx=fl_ctx, min_responses=0, abort_signal=abort_signal)
        return {ct.client.name: ct.result for ct in task.client_tasks}, len(fobs.dumps(task.data))

    def _round(self, r: int, abort_signal: Signal, fl_ctx: FLContext) -> None:
        reg = self._reg
        t0 = time.time()
        request = {"round": r, "backbone_hash": self._backbone_hash, "recipe": self.recipe,
                   "min_labels": self.min_labels, "manifest": coord.manifest(reg)}
        results, request_bytes = self._broadcast(TRAIN_TASK, request, self.train_timeout, abort_signal, fl_ctx)
        answers, sizes, headers, failed = {}, {}, {}, []
        for site, res in results.items():
            rc = res.get_return_code() if res is not None else "no result"
            if res is None or rc != ReturnCode.OK:
                failed.append(coord.Verdict(site, "", "failed", f"site returned {rc}"))
                continue
            answers[site] = _plain(res)
            sizes[site] = len(fobs.dumps(res))
            headers[site] = sorted(res.get(ReservedHeaderKey.HEADERS) or {})
        verdicts = coord.merge(reg, answers, self._backbone_hash, self.max_val_drop, r, sizes) + failed
        for v in verdicts:
            # NVFlare's own envelope (task name, ids, peer context)
            v.received["nvflare_headers"] = headers.get(v.site, [])
        t_train = time.time() - t0
        summary = [{k: v.to_dict()[k] for k in ("site", "institution", "status", "reason", "layer")} for v in verdicts]
        # every site already holds what it acknowledged in an earlier round of this job: send the rest only
        held = set.intersection(*(self._held.get(site, set()) for site in results)) if results else set()
        layers = [entry for entry in coord.registry_layers(reg) if entry["meta"]["name"] not in held]
        acks, sync_bytes = self._broadcast(SYNC_TASK, {"round": r, "layers": layers, "verdicts": summary}, 0,
                                           abort_signal, fl_ctx)
        for site, a in acks.items():
            if a is not None and a.get_return_code() == ReturnCode.OK and not a.get("conflicts"):
                self._held[site] = held | {entry["meta"]["name"] for entry in layers}
        record = {
            "round": r, "seconds": round(time.time() - t0, 2), "seconds_train_and_merge": round(t_train, 2),
            "request_bytes_per_site": request_bytes, "sync_bytes_per_site": sync_bytes, "layers_sent": len(layers),
            "verdicts": [v.to_dict() for v in verdicts],
            "sync": {site: (_plain(a) if a is not None and a.get_return_code() == ReturnCode.OK
                            else {"error": str(a and a.get_return_code())})
                     for site, a in acks.items()},
            "registry": [i.name for i in reg.list()], "signature": reg.signature(),
        }
        path = reg.root / REPORT_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        rounds = json.loads(path.read_text()) if path.exists() else []
        path.write_text(json.dumps(rounds + [record], indent=2, default=str))
        for v in verdicts:
            self.log_info(fl_ctx, f"round {r}: {v.site} ({v.institution}) {v.status} {v.layer or ''} {v.reason}")


class CasamSiteExecutor(Executor):
    """A site: trains its own layer on its own labels, and serves the merged registry it gets back.

    Args:
        data: the site's labelled data (default ``$CASAM_SITE_DATA``): a dataset folder or a MONAI Label studies folder.
        institution: the institution it trains for (default ``$CASAM_SITE_INSTITUTION``, else the site name).
        registry: the registry its MONAI Label app serves (default ``$CASAM_REGISTRY``).
        backbone, checkpoint: its copy of the consortium's backbone.
        cache: embedding cache folder (default ``$CASAM_CACHE``).
        modality: free text stored with the layer.
    """

    def __init__(self, data: str = "", institution: str = "", registry: str = "", backbone: str = DEFAULT_BACKBONE,
                 checkpoint: str = "", cache: str = "", modality: str = ""):
        super().__init__()
        self.data = data
        self.institution = institution
        self.registry = registry
        self.backbone = backbone
        self.checkpoint = checkpoint
        self.cache = cache
        self.modality = modality
        self._bb = None

    def _registry(self) -> LayerRegistry:
        return LayerRegistry(self.registry or default_registry())

    def execute(self, task_name: str, shareable: Shareable, fl_ctx: FLContext, abort_signal: Signal) -> Shareable:
        site = fl_ctx.get_identity_name()
        try:
            if task_name == TRAIN_TASK:
                if self._bb is None:
                    self._bb = _load_backbone(self.backbone, self.checkpoint)
                data = self.data or os.environ.get("CASAM_SITE_DATA", "")
                inst = self.institution or os.environ.get("CASAM_SITE_INSTITUTION", "") or site
                payload = train_round(_plain(shareable), self._bb, data, inst, site, self.modality,
                                      self.cache or default_cache())
                out = _shareable(payload)
                self._log_outbox(task_name, describe(payload, len(fobs.dumps(out))))
                self.log_info(fl_ctx, f"{site}: {payload['status']} {payload['reason']}")
                return out
            if task_name == SYNC_TASK:
                ack = sync(self._registry(), shareable.get("layers") or [])
                out = _shareable(ack)
                self._log_outbox(task_name, {"keys": sorted(ack), "wire_bytes": len(fobs.dumps(out))})
                self.log_info(fl_ctx, f"{site}: synced {ack['added']} (conflicts {ack['conflicts']})")
                return out
            return make_reply(ReturnCode.TASK_UNKNOWN)
        except Exception as e:  # noqa: BLE001 - reported to the coordinator as a failed site, with the log here
            self.log_exception(fl_ctx, f"{task_name} failed: {e}")
            return make_reply(ReturnCode.EXECUTION_EXCEPTION)

    def _log_outbox(self, task_name: str, summary: Dict[str, Any]) -> None:
        path = self._registry().root / OUTBOX_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "task": task_name, **summary}
            f.write(json.dumps(entry, default=str) + "\n")
