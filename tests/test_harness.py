"""LM Evaluation Harness suite: every request and metric against a float64 reference run through lm-eval.

The reference (tests/harness_reference.py) answers each request with a float64 numpy forward pass of
exactly that request's tokens; lm-eval's own `simple_evaluate` aggregates its answers. The suite must
give the same per-request answers (log-likelihoods within rtol 1e-4, is_greedy and generations
equal) and the same metrics, on meshes (8), (4,2) and (2,2,2), packed or not.
"""

from __future__ import annotations

import json
import os
import pathlib
import random
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from tracker_eval_lm_harness.offline import prepare_environment

prepare_environment()  # before lm-eval (and with it `datasets`) is imported by the reference

from harness_config import MAX_LENGTH, TASKS, suite_options  # noqa: E402
from harness_models import TinyAttentionLM  # noqa: E402
from harness_reference import ReferenceLM, attention_lm_logits, tiny_lm_logits  # noqa: E402
from harness_tasks import write_shuffle_task, write_tasks  # noqa: E402
from tracker_eval_lm_harness.suite import HarnessSuite  # noqa: E402
from tracker_eval_lm_harness.tasks import SHIPPED  # noqa: E402

from tracker_eval.config import MeshConfig  # noqa: E402
from tracker_eval.errors import ConfigError  # noqa: E402
from tracker_eval.evaluation.models import adapt_model  # noqa: E402
from tracker_eval.evaluation.sharding import make_mesh  # noqa: E402
from tracker_eval.tasks import language_model as lm_task  # noqa: E402

_NETWORK: list[tuple[str, str]] = []
_WATCHING = [False]


def _audit(event: str, args: tuple) -> None:
    if _WATCHING[0] and event in ("socket.connect", "socket.getaddrinfo"):
        _NETWORK.append((event, repr(args[:2])))


sys.addaudithook(_audit)


@pytest.fixture(scope="module")
def tiny():
    model = lm_task.make_model()
    return model, lm_task.init_params(model, seed=3)


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory, tiny):
    reference = ReferenceLM(tiny_lm_logits(tiny[1]), max_length=MAX_LENGTH)
    return write_tasks(tmp_path_factory.mktemp("tasks"), greedy=reference.complete)


def _reference_results(logits_fn, *, include_path, tasks=TASKS, num_fewshot=1, limit=None, tokenizer=None,
                       seeds=(None, None)):
    """lm-eval's own simple_evaluate over the float64 reference, run from inside the task folder
    (where lm-eval resolves the YAMLs' relative data paths itself); `seeds`: its random_seed and
    numpy_random_seed (None: left unseeded)."""
    from lm_eval import evaluator
    from lm_eval.tasks import TaskManager

    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(include_path)
        manager = TaskManager(include_path=str(include_path), include_defaults=False)
        return evaluator.simple_evaluate(
            model=ReferenceLM(logits_fn, max_length=MAX_LENGTH, tokenizer=tokenizer), tasks=tasks,
            task_manager=manager, num_fewshot=num_fewshot, limit=limit, bootstrap_iters=100, random_seed=seeds[0],
            numpy_random_seed=seeds[1], torch_random_seed=None, fewshot_random_seed=1234)


@pytest.fixture(scope="module")
def reference(tiny, task_dir):
    """The reference's results on the test tasks for the tiny LM's params of seed 3 and 4."""
    model = tiny[0]
    return {seed: _reference_results(tiny_lm_logits(lm_task.init_params(model, seed=seed)), include_path=task_dir)
            for seed in (3, 4)}


def _named(results) -> dict[str, float]:
    """The issue's naming: <task>/<metric>, or <task>/<filter>/<metric> for filters other than none."""
    out = {}
    for task, values in results["results"].items():
        for key, value in values.items():
            metric, comma, filter_name = key.partition(",")
            if comma and isinstance(value, float | int) and not isinstance(value, bool):
                out[f"{task}/{metric}" if filter_name == "none" else f"{task}/{filter_name}/{metric}"] = value
    return out


def _assert_same_answers(ours, reference, *, rtol=1e-4) -> None:
    """Per document and filter, the same lm-eval responses: log-likelihoods within `rtol`,
    is_greedy and generated text equal."""
    assert set(ours) == set(reference)
    for task, records in reference.items():
        by_key = {(r["doc_id"], r["filter"]): r for r in ours[task]}
        assert len(by_key) == len(records) == len(ours[task]), task
        for record in records:
            mine = by_key[(record["doc_id"], record["filter"])]
            assert mine["arguments"] == json.loads(json.dumps(record["arguments"])), task
            for got, want in zip(mine["resps"], record["resps"], strict=True):
                got, want = got[0], want[0]
                if isinstance(want, str):
                    assert got == want, (task, record["doc_id"])
                elif isinstance(want, tuple | list):
                    assert got[0] == pytest.approx(want[0], rel=rtol), (task, record["doc_id"])
                    assert got[1] == want[1], (task, record["doc_id"], "is_greedy")
                else:
                    assert got == pytest.approx(want, rel=rtol), (task, record["doc_id"])


def _assert_same_metrics(ours: dict[str, float], reference) -> None:
    expected = _named(reference)
    assert set(ours) == set(expected)
    for name, value in expected.items():
        assert ours[name] == pytest.approx(value, rel=1e-4, abs=1e-9), name


def _suite(model, mesh_shape, task_dir, *, packing, name="harness"):
    config = HarnessSuite.Config.from_mapping(suite_options(task_dir, packing=packing))
    return HarnessSuite(config, adapter=adapt_model(model), mesh=make_mesh(MeshConfig(*mesh_shape)), name=name)


@pytest.mark.parametrize(("mesh_shape", "packing"), [((8, 1, 1), False), ((4, 2, 1), True), ((2, 2, 2), False)],
                         ids=["mesh8", "mesh4x2-packed", "mesh2x2x2"])
def test_requests_and_metrics_equal_lm_eval_over_a_float64_reference(
        tiny, task_dir, reference, tmp_path, monkeypatch, mesh_shape, packing):
    model, params = tiny
    monkeypatch.chdir(tmp_path)  # not the task folder: relative data paths must still resolve
    state = random.getstate()
    _WATCHING[0] = True
    try:
        suite = _suite(model, mesh_shape, task_dir, packing=packing)
        first = suite.run(params, step=10)
        again = suite.run(params, step=20)
    finally:
        _WATCHING[0] = False
    assert _NETWORK == [], "the suite must not touch the network"
    assert random.getstate() == state, "the global random stream must be left as it was"
    _assert_same_answers(first.samples, reference[3]["samples"])
    _assert_same_metrics(first.metrics, reference[3])
    for name in ("t_mc/acc", "t_mc/acc_stderr", "t_mc/acc_norm", "t_both/acc", "t_ppl/word_perplexity",
                 "t_ppl/bits_per_byte", "t_gen/strict-match/exact_match", "t_gen/first-word/exact_match"):
        assert name in first.metrics, name
    assert first.metrics["t_gen/strict-match/exact_match"] == pytest.approx(0.5)  # the reference's own half
    assert again.metrics == first.metrics
    shapes = first.provenance["compiled_shapes"]
    assert 1 <= len(shapes) <= 3 and all(rows == 8 for rows, _ in shapes), shapes
    assert again.provenance["compiles_this_run"] == 0
    if packing:  # rows really hold several requests' inputs
        assert first.provenance["score_segments"] >= 1.25 * first.provenance["score_rows"], first.provenance
    assert first.provenance["requests"] == {"loglikelihood": 40, "loglikelihood_rolling": 4, "generate_until": 6}
    json.dumps(first.samples, allow_nan=False)
    suite.close()


def test_kept_answers_serve_only_their_scope_and_a_generation_continues_from_its_kept_tokens(
        tiny, task_dir, reference, tmp_path):
    """A second attempt of a step takes every kept answer and gives the same result; another step or
    task version takes none. A generation cut after k tokens and continued gives the same tokens."""
    model, params = tiny
    suite = _suite(model, (8, 1, 1), task_dir, packing=True, name="kept")
    suite.output_dir, suite.stream = str(tmp_path), "ckpts@suite"
    first = suite.run(params, step=5)
    kept = first.provenance["answers_kept"]
    assert kept > 0 and first.provenance["answers_reused"] == 0
    again = suite.run(params, step=5)
    assert again.provenance["answers_reused"] == kept and again.provenance["answers_kept"] == 0
    assert again.provenance["score_rows"] == 0  # nothing scored on the device again
    assert again.metrics == first.metrics and again.samples == first.samples
    _assert_same_metrics(again.metrics, reference[3])
    assert suite.run(params, step=6).provenance["answers_reused"] == 0  # another checkpoint
    versions = suite.tasks.versions
    suite.tasks.versions = lambda: {**versions(), "t_mc": "2.0"}
    assert suite.run(params, step=5).provenance["answers_reused"] == 0  # another task version

    from tracker_eval_lm_harness import generation  # noqa: PLC0415
    from tracker_eval_lm_harness.lm import HarnessLM  # noqa: PLC0415

    lm = HarnessLM(tokenizer=suite.tokenizer, engine=suite.engine, params=params, max_length=MAX_LENGTH,
                   widths=suite.widths, packing=True)
    steps = [0]
    execute = suite.engine.execute

    def counted(*args, **kwargs):
        steps[0] += 1
        return execute(*args, **kwargs)

    suite.engine.execute = counted
    prompts = [list(range(1, 10 + 3 * i)) for i in range(5)]
    whole = generation.greedy_tokens(lm, prompts, max_new=12, until=[])
    whole_steps, steps[0] = steps[0], 0
    cut = [tokens[:k] for k, tokens in zip((4, 5, 7, 11, 4), whole, strict=True)]
    assert all(len(tokens) > 4 for tokens in whole)
    assert generation.greedy_tokens(lm, prompts, max_new=12, until=[], started=cut) == whole
    assert steps[0] == whole_steps - 4  # decoding went on from the kept tokens
    suite.close()


def test_packed_rows_equal_one_request_per_row_for_a_model_that_honours_segments(task_dir):
    """A position-sensitive attention model: packing must restart positions and keep segments apart."""
    model = TinyAttentionLM()
    params = model.init(jax.random.key(5), np.zeros((1, 8), np.int32))["params"]
    results = {packing: _suite(model, (8, 1, 1), task_dir, packing=packing, name=f"p{packing}").run(params, step=1)
               for packing in (False, True)}
    packed = results[True].provenance
    assert packed["score_segments"] >= 1.25 * packed["score_rows"], packed  # several requests a row
    _assert_same_answers(results[True].samples, results[False].samples, rtol=1e-5)
    assert results[True].metrics == pytest.approx(results[False].metrics, rel=1e-5)
    # One request checked against a float64 forward pass of exactly its tokens, positions from 0.
    record = results[True].samples["t_mc"][3]
    context, continuation = record["arguments"][0]
    reference = ReferenceLM(attention_lm_logits(params), max_length=MAX_LENGTH)
    want = reference.loglikelihood([type("R", (), {"args": (context, continuation)})()])[0]
    assert record["resps"][0][0][0] == pytest.approx(want[0], rel=1e-4) and record["resps"][0][0][1] == want[1]


def test_a_tokenizer_json_serves_requests_like_lm_eval_over_a_reference(task_dir, tmp_path):
    """A byte-level BPE (tokenizer.json, trained here on pydoc's training text): multi-byte tokens, merges
    across the context/continuation boundary, stop strings that are not whole tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from tracker_eval.tasks import pydoc_text

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(pydoc_text.paragraphs("train")[:400], trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    bpe.save(str(tmp_path / "tokenizer.json"))
    model = TinyAttentionLM(vocab=bpe.get_vocab_size())
    params = model.init(jax.random.key(6), np.zeros((1, 8), np.int32))["params"]
    tasks = ["t_mc", "t_gen", "t_ppl"]
    tokenizer = str(tmp_path / "tokenizer.json")
    config = HarnessSuite.Config.from_mapping(suite_options(task_dir, tasks=tasks, tokenizer=tokenizer, packing=False))
    result = HarnessSuite(config, adapter=adapt_model(model), mesh=make_mesh(MeshConfig(8, 1, 1)),
                          name="bpe").run(params, step=1)
    reference = _reference_results(attention_lm_logits(params), include_path=task_dir, tasks=tasks,
                                   tokenizer=Tokenizer.from_file(tokenizer))
    _assert_same_answers(result.samples, reference["samples"])
    _assert_same_metrics(result.metrics, reference)


def test_shipped_pydoc_tasks_match_the_reference_and_their_samples_survive_the_ledger(tiny, tmp_path):
    model, params = tiny
    config = HarnessSuite.Config.from_mapping({"tasks": ["pydoc"], "limit": 4, "max_length": MAX_LENGTH,
                                               "batch_size": 8, "packing": True, "bootstrap_iters": 100})
    result = HarnessSuite(config, adapter=adapt_model(model), mesh=make_mesh(MeshConfig(4, 1, 2)),
                          name="pydoc").run(params, step=1)
    reference = _reference_results(tiny_lm_logits(params), include_path=SHIPPED, tasks=["pydoc"], num_fewshot=None,
                                   limit=4)
    _assert_same_answers(result.samples, reference["samples"])
    _assert_same_metrics(result.metrics, reference)
    assert {"pydoc_cloze/acc", "pydoc_ppl/bits_per_byte", "pydoc_gen/exact_match"} <= set(result.metrics)
    texts = [s["doc"]["text"] for s in result.samples["pydoc_ppl"]]
    assert max(len(t.encode()) for t in texts) > 2 * MAX_LENGTH  # several rolling windows
    from tracker_eval.tasks import pydoc_text
    train = pydoc_text.text("train")
    assert all(t not in train for t in texts), "perplexity texts must be held out of training"

    # The records travel with the result: stored beside the ledger, read back by a restarted process.
    from tracker_eval.evaluation.result import EvalResult
    from tracker_eval.ledger.steps import Ledger

    stored = EvalResult(step=1, checkpoint="/ckpt/1", metrics=result.metrics, suite="pydoc", samples=result.samples)
    ledger = Ledger(tmp_path, checkpoint_dir="/ckpt", config_hash="harness", loggers=["mlflow"])
    assert ledger.claim(1, owner="w") and ledger.record_metrics(stored, owner="w")
    ledger.close()
    back = Ledger(tmp_path, checkpoint_dir="/ckpt", config_hash="harness", loggers=["mlflow"]).result(1)
    assert back is not None and back.samples == result.samples and back.suite == "pydoc"
    _assert_same_answers(back.samples, reference["samples"])


def test_a_task_that_shuffles_with_random_equals_simple_evaluate_run_after_run(tiny, tmp_path):
    """`process_docs` shuffles each question's choices with Python's global `random` (as lm-eval's GPQA
    tasks do): every run, and a suite built again as after a restart, sees the documents of lm-eval's
    own `simple_evaluate` with its default seeds (or with the suite's seeds), and the caller's random
    and numpy streams are left as they were."""
    model, params = tiny
    folder = write_shuffle_task(tmp_path / "shuffle")
    options = {"tasks": ["t_shuffle"], "include_path": str(folder), "max_length": MAX_LENGTH, "batch_size": 8,
               "bootstrap_iters": 100}
    mesh = make_mesh(MeshConfig(8, 1, 1))
    random.seed(99)
    np.random.seed(99)
    caller = random.getstate(), np.random.get_state()
    runs = []
    for index, extra in enumerate([{}, {}, {"random_seed": 5}]):
        config = HarnessSuite.Config.from_mapping({**options, **extra})
        suite = HarnessSuite(config, adapter=adapt_model(model), mesh=mesh, name=f"shuffle{index}")
        runs += [suite.run(params, step=1) for _ in range(2 if index == 0 else 1)]
        suite.close()
    assert random.getstate() == caller[0]
    assert all(np.array_equal(a, b) for a, b in zip(np.random.get_state(), caller[1], strict=True))
    logits = tiny_lm_logits(params)
    default = _reference_results(logits, include_path=folder, tasks=["t_shuffle"], num_fewshot=None, seeds=(0, 1234))
    seeded = _reference_results(logits, include_path=folder, tasks=["t_shuffle"], num_fewshot=None, seeds=(5, 1234))
    for result, want in zip(runs, [default, default, default, seeded], strict=True):
        _assert_same_answers(result.samples, want["samples"])  # the arguments hold the shuffled prompts
        _assert_same_metrics(result.metrics, want)
    prompts = [[r["arguments"][0][0] for r in run.samples["t_shuffle"]] for run in (runs[0], runs[3])]
    assert prompts[0] != prompts[1], "another random_seed must shuffle otherwise"
    key = HarnessSuite.Config.from_mapping(options).numbers_key()
    assert (key["random_seed"], key["numpy_random_seed"], key["fewshot_seed"]) == (0, 1234, 1234)


@pytest.mark.parametrize(("options", "message"), [
    ({"tasks": []}, "tasks is empty"),
    ({"tasks": ["x"], "max_length": 1}, "max_length must be at least 2"),
    ({"tasks": ["x"], "batch_size": 0}, "batch_size must be a positive"),
    ({"tasks": ["x"], "limit": 1.5}, "limit 1.5 as a float"),
    ({"tasks": ["x"], "packing": "yes"}, "packing must be true or false"),
    ({"tasks": ["x"], "tokenizer": "/nonexistent/tokenizer.json"}, "neither 'bytes' nor an existing file"),
    ({"tasks": ["x"], "include_path": "/nonexistent"}, "is not a folder"),
    ({"tasks": ["x"], "bootstrap": 10}, "unknown key 'bootstrap'"),
    ({"tasks": "pydoc"}, "tasks must be a list of names"),
    ({"tasks": ["x"], "numpy_random_seed": -1}, "numpy_random_seed must lie in [0, 2**32 - 1]"),
])
def test_bad_config_values_are_one_line_errors_naming_the_key(options, message):
    with pytest.raises(ConfigError) as error:
        HarnessSuite.Config.from_mapping(options, where="suites.harness")
    text = str(error.value)
    assert message in text and "\n" not in text and text.startswith("suites.harness")


def test_tasks_and_models_the_suite_cannot_serve_fail_with_one_line(tiny, tmp_path, monkeypatch):
    from tracker_eval_lm_harness import tasks

    # lm-eval's own ~15,000 tasks take 15-40 s to index here: look up unknown names locally only.
    local_only = tasks.task_manager
    monkeypatch.setattr(tasks, "task_manager", lambda paths, builtin: local_only(paths, builtin=False))
    model, params = tiny
    (tmp_path / "sample.yaml").write_text(
        "task: t_sample\ndataset_path: json\ndataset_kwargs: {data_files: {test: d.jsonl}}\n"
        "output_type: generate_until\ntest_split: test\ndoc_to_text: '{{q}}'\ndoc_to_target: '{{a}}'\n"
        "generation_kwargs: {until: ['\\n'], do_sample: true, temperature: 0.7}\n")
    (tmp_path / "d.jsonl").write_text('{"q": "1+1=", "a": "2"}\n')
    mesh = make_mesh(MeshConfig(8, 1, 1))
    unknown = "unknown task 'no_such_task'.*local tasks are pydoc, pydoc_cloze"
    for names, message in ((["t_sample"], "asks for sampling"), (["no_such_task"], unknown)):
        config = HarnessSuite.Config.from_mapping({"tasks": names, "include_path": str(tmp_path)})
        with pytest.raises(ConfigError, match=message) as error:
            HarnessSuite(config, adapter=adapt_model(model), mesh=mesh)
        assert "\n" not in str(error.value)
    conv_only = adapt_model(lambda variables, tokens: model.apply(variables, tokens))
    config = HarnessSuite.Config.from_mapping({"tasks": ["pydoc_cloze"], "limit": 2, "packing": True})
    with pytest.raises(ConfigError, match="packing: true calls the model with segment_ids="):
        HarnessSuite(config, adapter=conv_only, mesh=mesh).run(params, step=1)


def test_two_processes_follow_process_0_match_the_reference_and_fail_or_stop_together(task_dir, reference, tmp_path):
    """2 processes x 4 devices: process 0 drives lm-eval, process 1 runs the same batches; the scores of
    two checkpoints match the float64 reference, and both processes return them. Process 1 failing
    inside the engine fails that run on both at once (none waits in a broadcast) and the next run
    scores again; a stop request on process 0 abandons the run on both; no run's keys stay behind."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}
    env.update(XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu",
               PYTHONPATH=str(pathlib.Path(__file__).parent))
    child = pathlib.Path(__file__).with_name("harness_multihost_child.py")
    outs = [tmp_path / f"p{i}.json" for i in range(2)]
    procs = [subprocess.Popen([sys.executable, str(child), str(port), str(i), str(task_dir), str(outs[i])], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    try:
        done = [proc.communicate(timeout=240) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    assert [proc.returncode for proc in procs] == [0, 0], [err[-3000:] for _, err in done]
    (leader, keys), (follower, _) = ((d["runs"], d["keys"]) for d in (json.loads(out.read_text()) for out in outs))
    for index, seed in ((0, 3), (1, 4), (3, 4)):
        mine, theirs = leader[index], follower[index]
        assert "error" not in mine and "error" not in theirs, (mine.get("error"), theirs.get("error"))
        assert theirs["metrics"] == mine["metrics"] and theirs["samples"] == {}
        _assert_same_answers(mine["samples"], reference[seed]["samples"])
        _assert_same_metrics(mine["metrics"], reference[seed])
    assert leader[0]["metrics"] != leader[1]["metrics"]  # two checkpoints, two sets of scores
    assert len(leader[1]["provenance"]["compiled_shapes"]) <= 3 and leader[1]["provenance"]["compiles_this_run"] == 0
    failed = follower[2]
    assert failed["error"] == "RuntimeError: injected engine failure on process 1"
    assert leader[2]["error"] == "PeerFailedError: process 1: RuntimeError: injected engine failure on process 1"
    # The README's bound for eval suites: a process waiting on the agreement learns at once (< POLL_S).
    assert 0 <= leader[2]["ended_at"] - failed["failed_at"] < 5.0, (leader[2], failed)
    assert leader[4]["error"].startswith("EvalAborted: evaluation abandoned at a stop request")
    assert follower[4]["error"].startswith("EvalAborted: process 0 abandoned this evaluation at a stop request")
    assert not [k for k in keys if "harness" in k], keys
    # Resume: process 0 kept the answers of the stopped attempt; the next computes only the rest,
    # the other process following it, and both return the uninterrupted run's result.
    assert leader[5]["error"].startswith("EvalAborted") and follower[5]["error"].startswith("EvalAborted")
    resumed = leader[6]["provenance"]
    assert resumed["answers_reused"] > 0 and leader[0]["provenance"]["answers_reused"] == 0, resumed
    assert resumed["score_rows"] < leader[0]["provenance"]["score_rows"], resumed
    assert leader[6]["metrics"] == leader[0]["metrics"] and leader[6]["samples"] == leader[0]["samples"]
    assert follower[6]["metrics"] == leader[6]["metrics"]
    print(f"process 0 raised {leader[2]['ended_at'] - failed['failed_at']:.2f} s after process 1 failed")


@pytest.mark.parametrize("packing", [False, True])
def test_rows_hold_every_prediction_once_after_its_own_context(packing):
    """Truncation, prefix sharing (one row serving several requests, extra targets at one column,
    crowded hosts split into copies), packing: each prediction of each request is asked exactly once,
    at a column whose segment holds exactly that request's context, in at most three widths."""
    from tracker_eval_lm_harness.rows import extras_capacity, score_batches, score_segments, width_ladder

    rng = np.random.default_rng(1)
    length = 128
    pairs = [(list(rng.integers(1, 256, rng.integers(1, 200))), list(rng.integers(1, 256, rng.integers(1, 9))))
             for _ in range(60)]
    shared = list(rng.integers(1, 256, 5))
    pairs += [(shared, [int(t)]) for t in rng.integers(1, 256, 70)]  # one column, 70 targets
    pairs += [(shared + [7], [8, 9]), (shared, [7, 8])]  # inputs that are prefixes of others
    widths = width_ladder(length)
    segments = score_segments(pairs, max_length=length, max_extras=extras_capacity(widths[0]))
    batches = list(score_batches(segments, rows=4, widths=widths, packing=packing))
    assert len({b["tokens"].shape for b in batches}) <= 3 and len(segments) < len(pairs)
    seen = []
    for batch in batches:
        extras = batch["extra_owner"].shape[1]
        dense, extra = np.argwhere(batch["owner"] >= 0), np.argwhere(batch["extra_owner"] >= 0)
        asked = [(r, c, batch["target"][r, c], batch["owner"][r, c]) for r, c in dense]
        asked += [(r, batch["extra_column"][r, k], batch["extra_target"][r, k], batch["extra_owner"][r, k])
                  for r, k in extra]
        assert all(k < extras for _, k in extra)
        for row, column, target, owner in asked:
            context, continuation = pairs[owner]
            whole = (context + continuation)[-(length + 1):]
            position = batch["positions"][row, column]
            start = column - position
            assert (batch["segment_ids"][row, start:column + 1] == batch["segment_ids"][row, column]).all()
            assert batch["tokens"][row, start:column + 1].tolist() == whole[:position + 1]
            k = position + 1 - (len(whole) - len(continuation))
            assert 0 <= k < len(continuation) and target == continuation[k]
            seen.append((owner, k))
    assert sorted(seen) == sorted((i, k) for i, (_, cont) in enumerate(pairs) for k in range(len(cont)))


def test_packing_puts_a_mostly_padding_last_batch_in_narrower_rows():
    """Lengths log-uniform up to max_length: the full-width batches come out nearly full, and the
    shortest segments, which would leave a last full-width batch mostly padding, go to narrower rows."""
    from tracker_eval_lm_harness.rows import extras_capacity, score_batches, score_segments, width_ladder

    rng = np.random.default_rng(4)
    length, rows = 128, 4
    lengths = np.exp(rng.uniform(np.log(16), np.log(length), 75)).astype(int)
    pairs = [(list(rng.integers(1, 256, n)), list(rng.integers(1, 256, 2))) for n in lengths]
    widths = width_ladder(length)
    segments = score_segments(pairs, max_length=length, max_extras=extras_capacity(widths[0]))
    batches = list(score_batches(segments, rows=rows, widths=widths, packing=True))
    shapes = [b["tokens"].shape for b in batches]
    tokens = sum(len(s.tokens) for s in segments)
    assert sum(int((b["segment_ids"] > 0).sum()) for b in batches) == tokens  # every token once
    narrow = [width for _, width in shapes if width < length]
    assert narrow and shapes[len(narrow):] == [(rows, length)] * (len(shapes) - len(narrow)), shapes
    # Cheaper than any packing into full-width batches only, which needs at least this many:
    assert sum(width for _, width in shapes) < -(-tokens // (rows * length)) * length, (shapes, tokens)
