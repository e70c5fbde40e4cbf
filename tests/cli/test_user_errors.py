"""Bad input at the command line: one line that names the file, line or option and what to do,
exit status 2, no traceback, nothing half-written; and the predictions file."""

from __future__ import annotations

import argparse
import json
import shutil

import pytest

pytest.importorskip("transformers")

from eekernels.cli import eval as eval_cmd  # noqa: E402
from eekernels.cli import train as train_cmd  # noqa: E402

from ..text_task import make_files, write_tsv  # noqa: E402


def run(mod, argv):
    p = argparse.ArgumentParser()
    mod.add_arguments(p)
    return mod.run(p.parse_args([str(a) for a in argv]))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    f = make_files(tmp_path_factory.mktemp("user_errors"))
    out = f["dir"] / "trained"
    assert run(train_cmd, ["--model", f["clf"], "--train", f["train"], "--out", out, "--max-steps", 4,
                           "--lr", 1e-2, "--cpu"]) == 0
    f["trained"] = out
    return f


def check(capsys, rc, *needles):
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err and sum("error:" in line for line in err.splitlines()) == 1, err
    for n in needles:
        assert n in err, err


def test_non_utf8_data_names_file_line_and_byte(files, tmp_path, capsys):
    bad = tmp_path / "latin1.tsv"
    bad.write_bytes("sentence\tlabel\ngood film\t1\ncaf\xe9 bad\t0\n".encode("latin1"))
    rc = run(train_cmd, ["--model", files["clf"], "--train", bad, "--out", tmp_path / "o", "--cpu"])
    check(capsys, rc, "latin1.tsv, line 3, column 4", "0xe9", "UTF-8")
    assert not (tmp_path / "o").exists()


def test_corrupt_config_json_is_blamed_on_the_config(files, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(files["clf"], broken)
    (broken / "config.json").write_text('{"model_type": "bert", ')
    rc = run(train_cmd, ["--model", broken, "--train", files["train"], "--out", tmp_path / "o", "--cpu"])
    check(capsys, rc, "config.json is not valid JSON", "damaged")


def test_out_naming_an_existing_file(files, tmp_path, capsys):
    f = tmp_path / "model.bin"
    f.write_text("x")
    rc = run(train_cmd, ["--model", files["clf"], "--train", files["train"], "--out", f, "--cpu"])
    check(capsys, rc, "--out", "is a file; give a directory")
    assert f.read_text() == "x"


def test_missing_weights_in_eval(files, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(files["trained"], copy)
    (copy / "model.safetensors").unlink()
    rc = run(eval_cmd, ["--model", copy, "--data", files["dev"], "--threshold", 0.5, "--cpu", "--no-progress"])
    check(capsys, rc, "holds no model weights", "model.safetensors", "incomplete")


def test_predictions_for_an_unlabelled_file(files, tmp_path, capsys):
    data = write_tsv(tmp_path / "test.tsv", ["index", "sentence"], [(0, "good film"), (1, "bad plot"), (2, "good")])
    pred = tmp_path / "p" / "pred.tsv"
    rc = run(eval_cmd, ["--model", files["trained"], "--data", data, "--threshold", 0.3, "--predictions", pred,
                        "--report", tmp_path / "r.json", "--cpu", "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    lines = pred.read_text().splitlines()
    assert lines[0] == "index\tprediction\tlabel\texit_layer\tscore" and len(lines) == 4
    rows = [line.split("\t") for line in lines[1:]]
    assert [r[0] for r in rows] == ["0", "1", "2"] and all(r[2] in ("0", "1") for r in rows)
    assert all(1 <= int(r[3]) <= 4 and float(r[4]) >= 0 for r in rows)
    assert json.loads((tmp_path / "r.json").read_text())["accuracy"] is None
    # an unlabelled file cannot calibrate
    rc = run(eval_cmd, ["--model", files["trained"], "--data", data, "--target-speedup", 2, "--predictions", pred,
                        "--cpu", "--no-progress"])
    check(capsys, rc, "has no labels", "--threshold")
