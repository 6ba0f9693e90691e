"""Federated CA-SAM on NVFlare: each site trains its own Alignment Layer; only the layer travels.

Modules:
    payload: what a site sends (and :func:`~casam.federated.payload.check_outgoing`, which refuses anything else).
    site: a site's round (read its labels, train with :func:`casam.training.layer.train_layer`) and the registry sync.
    coordinator: the checks of a returned layer and the merge into one registry (not FedAvg: nothing is averaged).
    flare: the NVFlare controller (coordinator) and executor (site).
    job: the NVFlare job, the simulator run, the central reference and ``casam federated``.

Only ``flare`` and ``job`` import nvflare (``pip install casam[federated]``; install.sh installs it).
"""
