"""Evaluation of casam: the continual stream benchmark, ``casam evaluate`` and the provenance of results.

Modules:
    benchmark: ``casam benchmark`` (and ``benchmarks/continual.py``): options and the run, stage by stage.
    stages: the benchmark's state (:class:`~casam.evaluation.stages.BenchmarkState`) and its named stages: encode,
        plain scores, one step per task of each trained method, click sequences, joint.
    results: the benchmark's results read from that state: R matrices, router, recipe and the project's targets.
    report: the reports' number format, the benchmark's Markdown table, R heatmaps and atomic JSON write.
    evaluate: ``casam evaluate``: a registry's layers judged on your own labelled test images.
    provenance: what every result file carries: the machine it was measured on, and JSON-safe numbers.

How a prompt is scored (:mod:`casam.scoring.score`) and the benchmark's click-sequence protocol
(:mod:`casam.scoring.protocol`) live in :mod:`casam.scoring`: training's validation uses them too.
"""
