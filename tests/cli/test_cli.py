"""The `eekernels` command: env, demo (the README's main job), op-demo, bench smoke run."""

import json
import subprocess
import sys

import pytest

pytest.importorskip("transformers")


def run_cli(*args, timeout=600):
    r = subprocess.run([sys.executable, "-m", "eekernels", *args], capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return r.stdout


def test_env_lists_backends():
    out = run_cli("env")
    for b in ("torch", "cpu", "triton", "cuda"):
        assert b in out


def test_demo_main_job():
    out = run_cli("demo", "--batch", "16", "--repeats", "1", "--device", "cpu")
    assert "exit histogram" in out and "layer speed-up" in out and "wall clock" in out


def test_op_demo_agrees():
    out = run_cli("op-demo", "--rows", "64", "--hidden", "48", "--repeats", "2", "--device", "cpu")
    assert "OK: every backend agrees" in out


def test_bench_tiny_writes_json_and_plot(tmp_path):
    out = run_cli("bench", "--tiny", "--device", "cpu", "--batch-sizes", "1,4", "--exit-fracs", "0.2",
                  "--repeats", "1", "--no-compile", "--out", str(tmp_path))
    data = json.loads((tmp_path / "e2e.json").read_text())
    assert [r["batch"] for r in data["rows"]] == [1, 4]
    assert all(r["efficiency"] > 0 and r["ideal_layer_speedup"] >= 1 for r in data["rows"])
    assert (tmp_path / "e2e.png").stat().st_size > 1000
    assert "samples/s" in out


def test_bench_with_a_measured_profile(tmp_path):
    report = tmp_path / "report.json"
    report.write_text(json.dumps({"exit_histogram": {"1": 3, "2": 1, "4": 0}, "num_layers": 4, "mean_exit_layer": 1.25}))
    run_cli("bench", "--tiny", "--device", "cpu", "--batch-sizes", "4", "--exit-fracs", "0.5",
            "--measured-profile", str(report), "--repeats", "1", "--no-compile", "--out", str(tmp_path))
    rows = json.loads((tmp_path / "e2e.json").read_text())["rows"]
    assert len(rows) == 2 and rows[1]["profile"].startswith("measured (report.json")
    assert rows[1]["ideal_layer_speedup"] == pytest.approx(4 * 4 / (1 + 1 + 1 + 2))


def test_bench_every_method_on_the_same_profiles(tmp_path):
    run_cli("bench", "--tiny", "--device", "cpu", "--batch-sizes", "3", "--exit-fracs", "0.3",
            "--methods", "early-exit,past-future,consistentee,cascadebert,fixed-capacity", "--repeats", "1",
            "--no-compile",
            "--out", str(tmp_path))
    rows = json.loads((tmp_path / "e2e.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["early-exit", "past-future", "consistentee", "cascadebert",
                                           "fixed-capacity"]
    per_layer = rows[0]["ideal_layer_speedup"]
    assert all(r["ideal_layer_speedup"] == per_layer for r in rows[:3] + rows[4:])  # one profile, per-layer methods
    assert rows[3]["ideal_layer_speedup"] != per_layer  # the cascade counts its small member too
    assert all(r["t_no_exit_ms"] > 0 and r["efficiency"] > 0 for r in rows)


def test_bench_token_methods_rows(tmp_path):
    run_cli("bench", "--tiny", "--device", "cpu", "--batch-sizes", "2", "--exit-fracs", "0.3", "--repeats", "1",
            "--no-compile", "--token-methods", "hashee,mpee", "--token-seq-lens", "16", "--token-batch-sizes", "2",
            "--out", str(tmp_path))
    rows = json.loads((tmp_path / "e2e_tokens.json").read_text())["rows"]
    assert {r["method"] for r in rows} == {"hashee", "mpee"}
    assert all(r["flops_speedup"] > 1.0 and r["efficiency"] > 0 for r in rows)
