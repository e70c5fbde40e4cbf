"""eekernels.data (reading labelled files, encoding) and the train / eval commands, on a tiny
BERT with a tiny WordPiece vocabulary; plus read_examples on the real files in shared/data."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from eekernels.cli import eval as eval_cmd  # noqa: E402
from eekernels.cli import train as train_cmd  # noqa: E402
from eekernels.data import encode, read_examples  # noqa: E402

from ..helpers import SHARED_DATA  # noqa: E402
from ..text_task import N_LAYERS, make_files, nli_rows, write_tsv  # noqa: E402


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return make_files(tmp_path_factory.mktemp("ee_train_eval"))


def parse(add, argv):
    p = argparse.ArgumentParser()
    add(p)
    return p.parse_args([str(a) for a in argv])


def train(argv):
    return train_cmd.run(parse(train_cmd.add_arguments, argv))


def evaluate(argv):
    return eval_cmd.run(parse(eval_cmd.add_arguments, ["--no-progress", *argv]))


@pytest.fixture(scope="module")
def trained(files):
    """One joint-loss training run on the TSV task (with dev): the model dir for the eval tests,
    which read exits confident at max-prob 0.9. Random batches get there in these 36 steps;
    length-grouped ones (the default) leave this task's exits right but at ~0.75."""
    out = files["dir"] / "trained"
    rc = train(["--model", files["clf"], "--train", files["train"], "--dev", files["dev"], "--out", out,
                "--epochs", 3, "--batch-size", 16, "--lr", 1e-2, "--seed", 0, "--cpu", "--logging-steps", 12,
                "--random-batches"])
    assert rc == 0
    return out


# ---------------------------------------------------------------------- read_examples
def test_read_tsv_csv_jsonl(files):
    tsv = read_examples(files["dev"])  # BOM in the header
    assert tsv.text_columns == ("sentence",) and tsv.label_column == "label"
    assert len(tsv) == 64 and set(tsv.labels) == {0, 1} and tsv.label_names == ["0", "1"]
    assert isinstance(tsv.texts[0], str) and not tsv.is_pair

    c = read_examples(files["csv"])
    assert c.text_columns == ("text",) and c.label_names == ["neg", "pos"] and len(c) == 40
    assert c.texts[0].endswith(', "quoted", with commas')  # the csv module undid the quoting

    j = read_examples(files["nli_dev"])
    assert j.text_columns == ("premise", "hypothesis") and j.is_pair and isinstance(j.texts[0], tuple)
    assert j.label_names == ["contradiction", "entailment", "neutral"]
    assert [j.label_names[i] for i in j.labels[:5]] == [r["label"] for r in nli_rows(45, 5)[:5]]


def test_read_explicit_columns_and_label_names(tmp_path):
    p = write_tsv(tmp_path / "x.tsv", ["id", "a", "b", "y"],
                  [(0, 'he said "hi', "ok", "no"), (1, "c", "d", "yes"), (2, "e", "f", "yes")])
    e = read_examples(p, text_columns="a,b", label_column="y")
    assert e.texts[0] == ('he said "hi', "ok")  # no quoting in TSV: the stray quote stays
    assert e.labels == [0, 1, 1] and e.label_names == ["no", "yes"]
    # A model's label names fix the mapping, even when this file lacks a class.
    e2 = read_examples(p, ["a"], "y", label_names=["yes", "no", "maybe"])
    assert e2.labels == [1, 0, 0] and e2.label_names == ["yes", "no", "maybe"] and e2.texts[1] == "c"
    # Integer labels: kept as integers, names are their strings up to the largest.
    q = write_tsv(tmp_path / "q.tsv", ["sentence", "label"], [("a", 2), ("b", 0)])
    e3 = read_examples(q)
    assert e3.labels == [2, 0] and e3.label_names == ["0", "1", "2"]


def _bad_files(tmp_path):
    t = tmp_path
    (t / "empty.tsv").write_text("")
    write_tsv(t / "header_only.tsv", ["sentence", "label"], [])
    (t / "data.xml").write_text("<a/>")
    write_tsv(t / "test.tsv", ["index", "sentence"], [(0, "good movie")])
    write_tsv(t / "notext.tsv", ["body", "label"], [("good", 1)])
    (t / "ragged.tsv").write_text("sentence\tlabel\ngood\t1\nbad movie\t0\textra\n")
    write_tsv(t / "neg.tsv", ["sentence1", "sentence2", "label"], [("a", "b", 0), ("c", "d", -1)])
    (t / "bad.jsonl").write_text('{"text": "a", "label": 1}\n{not json\n')
    (t / "nokey.jsonl").write_text('{"text": "a", "label": 1}\n{"text": "b"}\n')
    (t / "ragged.csv").write_text('text,label\n"a, b",1\nc,0,9\n')
    return t


@pytest.mark.parametrize("name,kwargs,needles", [
    ("missing.tsv", {}, ["missing.tsv", "no such file"]),
    ("empty.tsv", {}, ["empty.tsv", "empty file"]),
    ("header_only.tsv", {}, ["header_only.tsv", "no rows"]),
    ("data.xml", {}, ["data.xml", "unknown format", ".tsv"]),
    ("test.tsv", {}, ["test.tsv", "no label column", "unlabeled", "'index', 'sentence'"]),
    ("test.tsv", {"label_column": "gold"}, ["label column 'gold' not found", "'index', 'sentence'"]),
    ("notext.tsv", {}, ["notext.tsv", "no text column", "'body', 'label'"]),
    ("notext.tsv", {"text_columns": "sentence"}, ["text column 'sentence' not found", "'body', 'label'"]),
    ("notext.tsv", {"text_columns": "a,b,c"}, ["one or two text columns"]),
    ("ragged.tsv", {}, ["ragged.tsv", "line 3", "3 tab-separated fields", "header has 2"]),
    ("ragged.csv", {}, ["ragged.csv", "line 3", "3 comma-separated fields"]),
    ("neg.tsv", {}, ["neg.tsv", "negative label", "line 3", "unlabeled"]),
    ("bad.jsonl", {}, ["bad.jsonl", "line 2", "not valid JSON"]),
    ("nokey.jsonl", {}, ["nokey.jsonl", "line 2", "no field 'label'"]),
])
def test_read_examples_errors(tmp_path, name, kwargs, needles):
    t = _bad_files(tmp_path)
    with pytest.raises(ValueError) as ei:
        read_examples(t / name, **kwargs)
    for s in needles:
        assert s in str(ei.value), (s, str(ei.value))


def test_read_unknown_label_against_names(files):
    with pytest.raises(ValueError, match=r"not among the expected labels \['x', 'y'\]"):
        read_examples(files["csv"], label_names=["x", "y"])


# ---------------------------------------------------------------------- encode
def test_encode_pairs_padding_and_truncation(files):
    tok = transformers.AutoTokenizer.from_pretrained(files["clf"], local_files_only=True)
    ex = read_examples(files["nli_dev"])
    enc = encode(tok, ex, max_length=64)
    assert set(enc) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
    assert enc.num_truncated == 0
    lengths = enc["attention_mask"].sum(1)
    assert enc["input_ids"].shape == (45, int(lengths.max()))  # padded to the longest in the set
    assert (enc["token_type_ids"].sum(1) > 0).all()  # second segments are marked
    assert enc["labels"].tolist() == ex.labels
    assert (enc["input_ids"] != 1).all(), "words of the vocabulary must not map to [UNK]"
    with pytest.warns(UserWarning, match="truncated"):
        short = encode(tok, ex, max_length=6)
    assert short["input_ids"].shape[1] == 6
    assert short.num_truncated == int((lengths > 6).sum()) > 0


# ---------------------------------------------------------------------- train
def test_train_saves_model_and_learns(trained, files, capsys):
    from eekernels.models import EarlyExitModel

    assert json.loads((trained / "label_names.json").read_text()) == ["0", "1"]
    assert json.loads((trained / "eekernels.json").read_text())["method"] == "early-exit"
    assert (trained / "eekernels.safetensors").is_file()
    assert (trained / "vocab.txt").is_file() or (trained / "tokenizer.json").is_file()
    res = json.loads((trained / "train_results.json").read_text())
    assert res["exit_layers"] == [1, 2, 3, 4] and res["num_train"] == 192
    acc = res["dev_accuracy"]
    assert set(acc) == {"1", "2", "3", "4"}
    assert acc["4"] >= 0.9 and min(acc.values()) >= 0.7, acc
    m = EarlyExitModel.from_pretrained(str(trained))
    assert m.exit_layers == [1, 2, 3, 4] and m.num_labels == 2
    assert m.config.id2label == {0: "0", 1: "1"}


def test_train_prints_dev_accuracy(files, tmp_path, capsys):
    """Two-stage (DeeBERT) on a base encoder, a JSONL pair task with string labels, chosen exits."""
    out = tmp_path / "nli"
    rc = train(["--model", files["base"], "--train", files["nli_train"], "--dev", files["nli_dev"], "--out", out,
                "--max-steps", 4, "--batch-size", 16, "--lr", 1e-3, "--exit-layers", "2", "--two-stage",
                "--loss-weighting", "sum", "--cpu"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err[-2000:]
    assert "training loss: final" in captured.out and "internal" in captured.out
    assert "exit after layer  2" in captured.out and "exit after layer  4" in captured.out
    assert json.loads((out / "label_names.json").read_text()) == ["contradiction", "entailment", "neutral"]
    meta = json.loads((out / "eekernels.json").read_text())["options"]
    assert meta["exit_layers"] == [2, 4] and meta["loss_weighting"] == "sum"
    res = json.loads((out / "train_results.json").read_text())
    assert set(res["training_loss"]) == {"final", "internal"} and res["text_columns"] == ["premise", "hypothesis"]


@pytest.mark.parametrize("case", ["one_class", "exit_layers", "bad_exit_spec", "missing_train", "no_model",
                                  "dev_unknown_label", "unlabeled"])
def test_train_bad_input(files, tmp_path, capsys, case):
    args = {"--model": files["clf"], "--train": files["train"], "--out": tmp_path / "o", "--max-steps": 1,
            "--cpu": None}
    needle = {}
    if case == "one_class":
        args["--train"] = write_tsv(tmp_path / "one.tsv", ["sentence", "label"], [("good", "pos"), ("good a", "pos")])
        needle = "only one label value"
    elif case == "exit_layers":
        args["--exit-layers"] = "2,9"
        needle = "within 1..4"
    elif case == "bad_exit_spec":
        args["--exit-layers"] = "two"
        needle = "comma-separated layer numbers"
    elif case == "missing_train":
        args["--train"] = tmp_path / "nope.tsv"
        needle = "nope.tsv: no such file"
    elif case == "no_model":
        args["--model"] = tmp_path / "no-model"
        needle = "does not exist"
    elif case == "dev_unknown_label":
        args["--train"] = files["csv"]
        args["--dev"] = write_tsv(tmp_path / "d.tsv", ["text", "label"], [("good", "meh")])
        needle = "not among the expected labels ['neg', 'pos']"
    elif case == "unlabeled":
        args["--train"] = write_tsv(tmp_path / "test.tsv", ["index", "sentence"], [(0, "good")])
        needle = "unlabeled"
    argv = [x for k, v in args.items() for x in ([k] if v is None else [k, v])]
    assert train(argv) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err, err
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------- eval
def test_eval_threshold_report_and_plot(trained, files, tmp_path, capsys):
    report, plot = tmp_path / "r" / "report.json", tmp_path / "hist.png"
    rc = evaluate(["--model", trained, "--data", files["dev"], "--criterion", "max_prob", "--threshold", 0.9,
                   "--batch-size", 16, "--report", report, "--plot", plot, "--cpu"])
    out = capsys.readouterr().out
    assert rc == 0
    for s in ("accuracy (early exit)", "accuracy (full model)", "exit histogram", "layer speed-up",
              "FLOPs speed-up", "wall clock"):
        assert s in out, s
    r = json.loads(report.read_text())
    assert r["num_examples"] == 64 and r["num_batches"] == 4 and r["criterion"] == "max_prob"
    assert r["exit_layers"] == [1, 2, 3, 4] and sum(r["exit_histogram"].values()) == 64
    layers = [int(l) for l, k in r["exit_histogram"].items() for _ in range(k)]
    assert r["layer_speedup"] == pytest.approx(4 * 64 / sum(layers))
    assert r["layer_speedup"] > 1.2 and r["flops_speedup"] > 1.0  # the trained exits are confident
    assert r["full_accuracy"] >= 0.9 and r["accuracy"] >= 0.8
    assert r["time_early_exit_s"] > 0 and r["time_full_s"] > 0 and r["calibration"] is None
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 1000


def test_eval_target_speedup_calibrates(trained, files, tmp_path, capsys):
    report = tmp_path / "r.json"
    rc = evaluate(["--model", trained, "--data", files["dev"], "--target-speedup", 2.0, "--report", report, "--cpu"])
    out = capsys.readouterr().out
    assert rc == 0 and "calibrated on this data" in out
    r = json.loads(report.read_text())
    assert r["calibration"]["target_speedup"] == 2.0
    assert r["threshold"] == r["calibration"]["threshold"]
    # The engine reproduces what calibration predicted on the same data.
    assert r["layer_speedup"] == pytest.approx(r["calibration"]["layer_speedup"])
    assert r["layer_speedup"] >= 2.0


def test_eval_string_labels_through_label_names(files, tmp_path, capsys):
    """A model trained on string labels maps an eval file's strings with its own names."""
    out = tmp_path / "m"
    assert train(["--model", files["clf"], "--train", files["csv"], "--out", out, "--max-steps", 2, "--cpu"]) == 0
    sub = tmp_path / "only_pos.csv"
    sub.write_text("text,label\ngood movie,pos\ngood film,pos\n")  # one class only: still pos = 1
    report = tmp_path / "r.json"
    assert evaluate(["--model", out, "--data", sub, "--threshold", 0.5, "--report", report, "--cpu"]) == 0
    r = json.loads(report.read_text())
    assert r["label_names"] == ["neg", "pos"] and r["num_examples"] == 2


@pytest.mark.parametrize("threshold,needle", [(0.0, "never fires"), ("inf", "always fires")])
def test_eval_threshold_never_or_always_fires(trained, files, capsys, threshold, needle):
    rc = evaluate(["--model", trained, "--data", files["dev"], "--criterion", "entropy", "--threshold", threshold,
                   "--cpu"])
    out = capsys.readouterr().out
    assert rc == 0 and needle in out, out
    assert "layer speed-up: 1.000x" in out if needle == "never fires" else "layer speed-up: 4.000x" in out


@pytest.mark.parametrize("case", ["not_eekernels", "missing_dir", "labels_outside", "unlabeled", "negative",
                                  "patience_fraction", "negative_threshold", "bad_backend", "bad_speedup"])
def test_eval_bad_input(trained, files, tmp_path, capsys, case):
    model, data, extra = trained, files["dev"], ["--threshold", "0.5"]
    if case == "not_eekernels":
        model, needle = files["clf"], "was not saved by `eekernels train`"
    elif case == "missing_dir":
        model, needle = tmp_path / "nothing", "does not exist"
    elif case == "labels_outside":
        data = write_tsv(tmp_path / "three.tsv", ["sentence", "label"], [("good", 1), ("bad", 5)])
        needle = "outside the model's 2 classes"
    elif case == "unlabeled":
        data = write_tsv(tmp_path / "test.tsv", ["index", "sentence"], [(0, "good")])
        needle = "no label column"
    elif case == "negative":
        data = write_tsv(tmp_path / "n.tsv", ["sentence", "label"], [("good", 1), ("bad", -1)])
        needle = "negative label"
    elif case == "patience_fraction":
        extra, needle = ["--criterion", "patience", "--threshold", "1.5"], "whole number"
    elif case == "negative_threshold":
        extra, needle = ["--threshold=-1"], "must be a number >= 0"
    elif case == "bad_backend":
        extra, needle = ["--threshold", "0.5", "--backend", "gpu9"], "unknown backend"
    else:
        extra, needle = ["--target-speedup", "9"], "target_speedup must be in [1, 4]"
    rc = evaluate(["--model", model, "--data", data, *extra, "--cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and needle in err and "Traceback" not in err, err


def test_eval_needs_threshold_or_target(trained, files, capsys):
    assert evaluate(["--model", trained, "--data", files["dev"], "--cpu"]) == 2
    assert "give --threshold or --target-speedup" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse(eval_cmd.add_arguments, ["--model", trained, "--data", files["dev"], "--threshold", "1",
                                   "--target-speedup", "2"])


# ---------------------------------------------------------------------- the real files
def real(rel: str) -> Path:
    p = SHARED_DATA / rel
    if not p.is_file():
        pytest.skip(f"{p} not present")
    return p


def test_real_sst2_dev():
    e = read_examples(real("SST-2/dev.tsv"))
    assert len(e) == 872 and set(e.labels) == {0, 1} and e.label_names == ["0", "1"]
    assert (e.labels.count(0), e.labels.count(1)) == (428, 444)
    assert e.texts[0].startswith("it 's a charming and often affecting journey")


def test_real_mrpc_dev_pairs_with_bom():
    e = read_examples(real("MRPC/dev.tsv"))
    assert e.label_column == "Quality" and e.text_columns == ("#1 String", "#2 String")  # BOM stripped
    assert len(e) == 408 and e.is_pair and (e.labels.count(0), e.labels.count(1)) == (129, 279)
    assert any('"' in a or '"' in b for a, b in e.texts)  # quotes kept verbatim


def test_real_rte_dev_string_labels():
    e = read_examples(real("RTE/dev.tsv"))
    assert len(e) == 277 and e.text_columns == ("sentence1", "sentence2")
    assert e.label_names == ["entailment", "not_entailment"]
    assert (e.labels.count(0), e.labels.count(1)) == (146, 131)


def test_real_mnli_dev_jsonl():
    e = read_examples(real("MNLI/dev.jsonl"))
    assert len(e) == 9815 and e.text_columns == ("premise", "hypothesis")
    assert e.label_names == ["contradiction", "entailment", "neutral"]
    assert e.labels.count(e.label_names.index("entailment")) == 3479


def test_real_imdb_test_csv():
    e = read_examples(real("IMDb/test.csv"))
    assert len(e) == 500 and e.text_columns == ("text",) and e.label_names == ["neg", "pos"]
    assert e.labels.count(0) == e.labels.count(1) == 250
    assert max(len(t) for t in e.texts) > 5000


def test_real_unlabeled_test_files_are_refused():
    with pytest.raises(ValueError, match="unlabeled"):
        read_examples(real("SST-2/test.tsv"))
    with pytest.raises(ValueError, match="unlabeled"):
        read_examples(real("RTE/test.tsv"))


def test_train_continues_from_an_eekernels_dir(trained, files, tmp_path, capsys):
    out = tmp_path / "more"
    rc = train(["--model", trained, "--train", files["train"], "--out", out, "--max-steps", 1, "--cpu"])
    log = capsys.readouterr().out
    assert rc == 0 and "continuing training" in log
    assert "'exit_pooling': 'auto'" not in log and "'exit_pooling': 'cls'" in log  # the model's own, kept
    assert json.loads((out / "eekernels.json").read_text())["options"]["exit_layers"] == [1, 2, 3, 4]
    # A three-class task does not fit the trained two-class heads.
    rc = train(["--model", trained, "--train", files["nli_train"], "--out", tmp_path / "x", "--max-steps", 1, "--cpu"])
    assert rc == 2 and "2 classes, the training data has 3" in capsys.readouterr().err


# ---------------------------------------------------------------------- --method
#: (method, options, a file its directory holds, its own criterion, training steps and
#: learning rate (what learns the task; past-future's gates stall at 1e-2), how eval
#: picks the threshold: a target layer speed-up calibrated on dev (the most accurate
#: threshold reaching it, the slowest among equals: rows then leave at several exits), or
#: the paper's fixed threshold)
METHOD_RUNS = [
    ("past-future", ["strategy=concat"], "eekernels.safetensors", "entropy", 60, 3e-3, ["--target-speedup", 1.5]),
    ("consistentee", ["max_rounds=2", "num_samples=4", "alpha=0.3"], "eekernels.safetensors", "policy", 36, 1e-2,
     ["--threshold", 0.5]),
    ("mpee", ["prune_layers=2", "keep_ratio=0.5"], "eekernels.safetensors", "entropy", 48, 1e-2,
     ["--target-speedup", 1.5]),
    ("cascadebert", ["small_layers=1", "difficulty_folds=2", "difficulty_seeds=1", "difficulty_steps=4"],
     "member_1/config.json", "max_prob", 48, 1e-2, ["--target-speedup", 1.5]),
    ("hashee", ["hash=frequency"], "eekernels.json", "none", 48, 1e-2, []),
]

#: chance on the balanced two-class dev set is 0.5; trained, every method's full model
#: scores 1.0 on this task (the label is the first word)
LEARNED = 0.8


def logged_losses(printed: str) -> list:
    """The losses HF Trainer logged in its first run (the supervised stage of every method)."""
    first = printed.split("train_runtime")[0]
    return [float(v) for v in re.findall(r"'loss': '?(-?[0-9.]+)", first)]


@pytest.mark.parametrize("method,options,meta,criterion,steps,lr,rule", METHOD_RUNS, ids=[r[0] for r in METHOD_RUNS])
def test_train_and_eval_each_method(files, tmp_path, capsys, method, options, meta, criterion, steps, lr, rule):
    """Each method through the CLI on the learnable task: the loss falls, dev accuracy
    rises well above chance, and at a threshold calibrated on dev (the method's own rule)
    samples leave at more than one exit while accuracy stays well above chance."""
    out = tmp_path / method
    argv = ["--model", files["clf"], "--train", files["train"], "--dev", files["dev"], "--out", out,
            "--method", method, "--max-steps", steps, "--batch-size", 16, "--lr", lr, "--seed", 0, "--cpu",
            "--logging-steps", 4]
    for o in options:
        argv += ["--method-option", o]
    assert train(argv) == 0
    printed = capsys.readouterr().out
    assert f"model: {method}" in printed and "dev accuracy per exit" in printed
    losses = logged_losses(printed)
    assert len(losses) >= 4 and losses[-1] < 0.6 * losses[0], losses
    assert (out / meta).is_file()
    assert json.loads((out / "eekernels.json").read_text())["method"] == method
    res = json.loads((out / "train_results.json").read_text())
    assert res["method"] == method and len(res["dev_accuracy"]) == len(res["exit_layers"])
    assert res["dev_accuracy"][str(res["exit_layers"][-1])] >= LEARNED, res["dev_accuracy"]
    report = tmp_path / "report.json"
    rc = evaluate(["--model", out, "--data", files["dev"], *rule, "--batch-size", 16, "--report", report, "--cpu"])
    assert rc == 0
    r = json.loads(report.read_text())
    assert r["method"] == method and r["criterion"] == criterion  # the method's own rule by default
    assert sum(r["exit_histogram"].values()) == 64 and r["exit_layers"] == res["exit_layers"]
    assert r["full_accuracy"] >= LEARNED and r["accuracy"] >= LEARNED, r
    used = [l for l, k in r["exit_histogram"].items() if k > 0]
    if method == "hashee":  # tokens stop early, samples never do
        assert r["layer_speedup"] == 1.0 and r["flops_speedup"] > 1.0 and r["exit_histogram"] == {"4": 64}
    elif method == "consistentee":  # the learned policy leaves early (the task is easy at layer 1)
        assert r["layer_speedup"] > 1.5, r["exit_histogram"]
    elif method == "cascadebert":
        # the trained 1-layer member is certain of every dev row (max-prob 1.0 in float32: no
        # threshold separates them), so calibration sends all to it; the spread of its rule
        # is tested on unsaturated members in tests/methods/test_cascadebert.py
        assert r["layer_speedup"] >= 1.5 - 1e-9, r["exit_histogram"]
    else:
        assert len(used) >= 2 and r["layer_speedup"] >= 1.5 - 1e-9, r["exit_histogram"]
    if method == "cascadebert":  # the K-fold difficulty labels ran and DAR trained the small member
        assert {"member1", "member0", "member0-dar", "difficult_fraction"} <= set(res["training_loss"])
        assert 0.0 <= res["training_loss"]["difficult_fraction"] <= 1.0
    if method == "consistentee":
        assert "round2-exit-change" in res["training_loss"]


def test_method_options_are_checked(files, tmp_path, capsys):
    base = ["--model", files["clf"], "--train", files["train"], "--out", tmp_path / "x", "--max-steps", 1, "--cpu"]
    assert train(base + ["--method", "nope"]) == 2
    assert "unknown method 'nope'" in capsys.readouterr().err
    assert train(base + ["--method", "mpee", "--method-option", "keep_ratoi=0.5"]) == 2
    assert "has no option 'keep_ratoi'" in capsys.readouterr().err
    assert train(base + ["--method", "mpee", "--method-option", "keep_ratio=lots"]) == 2
    assert "expected a value like 0.7" in capsys.readouterr().err
    assert train(base + ["--method", "past-future", "--two-stage"]) == 2
    assert "--two-stage is not an option of --method past-future" in capsys.readouterr().err
    assert train(base + ["--method", "cascadebert", "--method-option", "help=1"]) == 0
    listed = capsys.readouterr().out
    for name in ("small_layers", "kd_alpha", "kd_temperature", "difficulty_folds", "difficulty_seeds",
                 "difficulty_steps", "cost of DAR"):
        assert name in listed, name
    assert train(base + ["--method", "consistentee", "--method-option", "help=1"]) == 0
    listed = capsys.readouterr().out
    assert "max_rounds" in listed and "tolerance" in listed


def test_eval_refuses_a_criterion_the_method_lacks(trained, files, capsys):
    rc = evaluate(["--model", trained, "--data", files["dev"], "--criterion", "policy", "--threshold", 0.5, "--cpu"])
    assert rc == 2
    assert "takes entropy, max_prob, patience" in capsys.readouterr().err


def test_eval_times_the_two_paths_alternately(trained, files, monkeypatch):
    """The wall-clock comparison alternates full model and early exit batch by batch, each
    going first in turn, so noise (or a paused process) lands on both paths."""
    from eekernels import evaluation
    from eekernels.models.base import EarlyExitBase

    calls = []
    early_exit = EarlyExitBase.early_exit

    def record_early(self, *a, **k):
        calls.append("early")
        return early_exit(self, *a, **k)

    full_model = EarlyExitBase.full_model

    def record_full_model(self):
        hf = full_model(self)

        def forward(*a, **k):
            calls.append("full")
            return hf(*a, **k)
        return forward

    monkeypatch.setattr(EarlyExitBase, "early_exit", record_early)
    monkeypatch.setattr(EarlyExitBase, "full_model", record_full_model)
    r = evaluation.evaluate(str(trained), str(files["dev"]), threshold=0.9, criterion="max_prob", batch_size=16,
                            cpu=True, progress=False, log=lambda s: None)
    timed = calls[2:]  # after one untimed warm-up of each
    assert r["num_batches"] == 4 and timed == ["full", "early", "early", "full"] * 2, calls
