"""Benchmarks of batch-export against its limits and against curl (``make bench``; issue 5).

``python -m benchmarks`` runs every section, prints a table of figures and ratios against their
targets, and writes ``benchmarks/RESULTS.md``. Sections:

* :mod:`benchmarks.orchestration` -- makespan against the rate-limit/preparation ideal, 429s.
* :mod:`benchmarks.transfer` -- throughput, CPU and peak RSS against curl and the verified pipeline
  (nginx on loopback serves the packages), whole process from spawn to exit, median of alternating
  runs with their spread; and the capped-storage case (nginx ``limit_rate 20m`` per connection)
  against ``aria2c -x8 -s8`` / ``-x16 -s16``. Prerequisites: ``apt-get update && apt-get install -y
  nginx aria2`` (missing tools make their rows say SKIPPED).
* :mod:`benchmarks.scale` -- 100,000-entry ``validate``; re-runs of finished 10,000/1,000-job
  manifests.

Nothing here is collected by pytest (no ``test_`` files; ``testpaths`` is ``tests/``).
"""
