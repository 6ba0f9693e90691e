"""Evaluation of casam: the continual stream benchmark and ``casam evaluate``.

Modules:
    benchmark: ``casam benchmark`` (and ``benchmarks/continual.py``): CA-SAM against its baselines on a stream of tasks.
    report: the benchmark's Markdown table, R heatmaps and atomic JSON write.
    evaluate: ``casam evaluate``: a registry's layers judged on your own labelled test images.

How a prompt is scored (:mod:`casam.scoring`) and the click-sequence protocol (:mod:`casam.interactive`) stay in
the core: training's validation uses them too.
"""
