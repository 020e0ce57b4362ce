"""Benchmarks of batch-export against its limits and against curl (``make bench``; issue 5).

``python -m benchmarks`` runs every section, prints a table of figures and ratios against their
targets, and writes ``benchmarks/RESULTS.md``. Sections:

* :mod:`benchmarks.orchestration` -- makespan against the rate-limit/preparation ideal, 429s.
* :mod:`benchmarks.transfer` -- throughput, CPU and peak RSS against curl and the verified pipeline
  (nginx on loopback serves the packages).
* :mod:`benchmarks.scale` -- 100,000-entry ``validate``; re-runs of finished 10,000/1,000-job
  manifests.

Nothing here is collected by pytest (no ``test_`` files; ``testpaths`` is ``tests/``).
"""
