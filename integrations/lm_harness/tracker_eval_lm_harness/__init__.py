"""LM Evaluation Harness (lm-eval) suite plug-in: downstream scores for every checkpoint, on the mesh.

Registered as `lm_harness` in the `tracker_eval.suites` entry-point group; the suite class is
`tracker_eval_lm_harness.suite:HarnessSuite` (options: `HarnessSuite.Config`). Importing this package
loads neither lm-eval nor `datasets`: they are imported when a suite is built, after the offline
switches are set.

Modules, along the path a request takes:
  config      the suite's options, checked when the config loads
  offline     network switches and private caches, set before `datasets` is imported
  seeds       lm-eval's global seeds, replayed for every run as simple_evaluate sets them
  tokenizer   UTF-8 bytes or a tokenizer.json
  tasks       lm-eval task loading (shipped `pydoc_tasks/`, include_path through `shims`)
  lm          lm-eval's `LM` interface (a `TemplateLM`) on process 0
  generation  generate_until: greedy decoding in batches
  rows        requests as fixed-shape batches (truncation, prefix sharing, packing)
  engine      batches through the compiled program; process 0 leads, others follow, all agree
  program     the compiled program: score or decode, one per row width
  results     lm-eval results as metric names and JSON-safe samples
  suite       `HarnessSuite` and `HarnessResult`
"""
