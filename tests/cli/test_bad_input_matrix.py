"""Many kinds of bad input at the command line, as a new user types them: each gives exit
status 2 and one ``error:`` line on stderr that names the option or file, no traceback, and
leaves no output behind. (The four messages that once were raw exceptions have their own
tests in test_user_errors.py.)"""

from __future__ import annotations

import json

import pytest

pytest.importorskip("transformers")

from eekernels.cli import main  # noqa: E402

from ..text_task import make_files, write_tsv  # noqa: E402


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    f = make_files(tmp_path_factory.mktemp("bad_input"))
    out = f["dir"] / "trained"
    assert main(["train", "--model", str(f["clf"]), "--train", str(f["train"]), "--out", str(out),
                 "--max-steps", "4", "--lr", "1e-2", "--cpu"]) == 0
    f["trained"] = out
    d = f["dir"]
    f["empty"] = write_tsv(d / "empty.tsv", ["sentence", "label"], [])
    f["nolabel"] = write_tsv(d / "nolabel.tsv", ["sentence", "score"], [("good", 1), ("bad", 0)])
    f["headeronly"] = d / "header.tsv"
    f["headeronly"].write_text("sentence\tlabel\n")
    f["bad_ext"] = d / "data.parquet"
    f["bad_ext"].write_text("x")
    f["bad_json"] = d / "broken.jsonl"
    f["bad_json"].write_text('{"sentence": "good", "label": 1}\n{"sentence": \n')
    f["not_a_model"] = d / "not_a_model"
    f["not_a_model"].mkdir()
    return f


def _train(f, tmp, *extra):
    return ["train", "--model", str(f["clf"]), "--train", str(f["train"]), "--out", str(tmp / "o"), "--cpu",
            "--max-steps", "2", *map(str, extra)]


def _eval(f, *extra):
    return ["eval", "--model", str(f["trained"]), "--data", str(f["dev"]), "--cpu", "--no-progress", *map(str, extra)]


#: (name, argv builder, a word the message must contain)
CASES = [
    ("train: missing train file", lambda f, t: ["train", "--model", str(f["clf"]), "--train", str(t / "nope.tsv"),
                                                "--out", str(t / "o"), "--cpu"], "nope.tsv"),
    ("train: model dir does not exist", lambda f, t: ["train", "--model", str(t / "nomodel"), "--train",
                                                      str(f["train"]), "--out", str(t / "o"), "--cpu"], "nomodel"),
    ("train: model dir without a model", lambda f, t: ["train", "--model", str(f["not_a_model"]), "--train",
                                                       str(f["train"]), "--out", str(t / "o"), "--cpu"], "not_a_model"),
    ("train: unknown method", lambda f, t: _train(f, t, "--method", "bogus"), "bogus"),
    ("train: unknown method option", lambda f, t: _train(f, t, "--method-option", "nonsense=1"), "nonsense"),
    ("train: method option without =", lambda f, t: _train(f, t, "--method-option", "strategy"), "strategy"),
    ("train: bad option value", lambda f, t: _train(f, t, "--method", "past-future", "--method-option",
                                                    "strategy=median"), "median"),
    ("train: negative learning rate", lambda f, t: _train(f, t, "--lr", "-1"), "lr"),
    ("train: zero batch size", lambda f, t: _train(f, t, "--batch-size", "0"), "batch"),
    ("train: non-numeric epochs", lambda f, t: _train(f, t, "--epochs", "many"), "--epochs"),
    ("train: exit layer past the last", lambda f, t: _train(f, t, "--exit-layers", "1,99"), "99"),
    ("train: exit layers not numbers", lambda f, t: _train(f, t, "--exit-layers", "a,b"), "exit"),
    ("train: empty train file", lambda f, t: ["train", "--model", str(f["clf"]), "--train", str(f["empty"]),
                                              "--out", str(t / "o"), "--cpu"], "empty.tsv"),
    ("train: header-only train file", lambda f, t: ["train", "--model", str(f["clf"]), "--train",
                                                    str(f["headeronly"]), "--out", str(t / "o"), "--cpu"], "header.tsv"),
    ("train: no label column", lambda f, t: ["train", "--model", str(f["clf"]), "--train", str(f["nolabel"]),
                                             "--out", str(t / "o"), "--cpu"], "label"),
    ("train: unknown text column", lambda f, t: _train(f, t, "--text-columns", "review"), "review"),
    ("train: unsupported file type", lambda f, t: ["train", "--model", str(f["clf"]), "--train", str(f["bad_ext"]),
                                                   "--out", str(t / "o"), "--cpu"], "data.parquet"),
    ("train: broken JSONL line", lambda f, t: ["train", "--model", str(f["clf"]), "--train", str(f["bad_json"]),
                                               "--out", str(t / "o"), "--cpu"], "broken.jsonl"),
    ("train: resume with nothing to resume", lambda f, t: _train(f, t, "--resume"), "resume"),
    ("train: unknown flag", lambda f, t: _train(f, t, "--learning-rate", "1"), "--learning-rate"),
    ("eval: missing data file", lambda f, t: ["eval", "--model", str(f["trained"]), "--data", str(t / "nope.tsv"),
                                              "--cpu", "--threshold", "0.5"], "nope.tsv"),
    ("eval: model dir not trained by eekernels", lambda f, t: ["eval", "--model", str(f["not_a_model"]), "--data",
                                                               str(f["dev"]), "--cpu", "--threshold", "0.5"],
     "not_a_model"),
    ("eval: negative threshold", lambda f, t: _eval(f, "--threshold", "-1"), "threshold"),
    ("eval: non-numeric threshold", lambda f, t: _eval(f, "--threshold", "high"), "--threshold"),
    ("eval: threshold and target together", lambda f, t: _eval(f, "--threshold", "0.5", "--target-speedup", "2"),
     "--target-speedup"),
    ("eval: target speed-up below 1", lambda f, t: _eval(f, "--target-speedup", "0.5"), "target_speedup"),
    ("eval: target speed-up past the first exit", lambda f, t: _eval(f, "--target-speedup", "50"), "target_speedup"),
    ("eval: unknown criterion", lambda f, t: _eval(f, "--criterion", "vibes"), "vibes"),
    ("eval: criterion the model lacks", lambda f, t: _eval(f, "--criterion", "policy", "--threshold", "0.5"),
     "policy"),
    ("eval: unknown backend", lambda f, t: _eval(f, "--threshold", "0.5", "--backend", "tpu"), "tpu"),
    ("eval: unknown executor", lambda f, t: _eval(f, "--threshold", "0.5", "--executor", "tensorrt"), "tensorrt"),
    ("eval: unknown engine", lambda f, t: _eval(f, "--threshold", "0.5", "--engine", "tensorrt"), "tensorrt"),
    ("eval: a rule the ORT graph lacks", lambda f, t: _eval(f, "--threshold", "2", "--criterion", "patience",
                                                            "--engine", "ort-graph"), "ort-graph"),
    ("eval: unlabelled file without --predictions", lambda f, t: _eval(f, "--threshold", "0.5", "--data",
                                                                       str(f["nolabel"])), "label"),
    ("no subcommand", lambda f, t: [], "command"),
]


@pytest.mark.parametrize("name,argv,needle", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_clear_line(files, tmp_path, capsys, name, argv, needle):
    try:
        rc = main(argv(files, tmp_path))
    except SystemExit as e:  # argparse's own usage errors
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2, f"{name}: exit status {rc}\n{err}"
    assert "Traceback" not in err, f"{name}:\n{err}"
    assert sum("error:" in line for line in err.splitlines()) == 1, f"{name}:\n{err}"
    assert needle.lower() in err.lower(), f"{name}: the message does not name {needle!r}:\n{err}"
    assert not (tmp_path / "o").exists(), f"{name}: left an output behind"
