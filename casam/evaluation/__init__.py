"""Evaluation of casam: the continual stream benchmark and ``casam evaluate``.

Modules:
    benchmark: ``casam benchmark`` (and ``benchmarks/continual.py``): options and the run, stage by stage.
    stages: the benchmark's state (:class:`~casam.evaluation.stages.BenchmarkState`) and its named stages: encode,
        plain scores, one step per task of each trained method, click sequences, joint.
    results: the benchmark's results read from that state: R matrices, router, recipe and the project's targets.
    report: the reports' number format, the benchmark's Markdown table, R heatmaps and atomic JSON write.
    evaluate: ``casam evaluate``: a registry's layers judged on your own labelled test images.

How a prompt is scored (:mod:`casam.scoring.score`) and the click-sequence protocol (:mod:`casam.scoring.protocol`) stay in
the core: training's validation uses them too.
"""
