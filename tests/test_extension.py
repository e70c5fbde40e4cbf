"""The extension loader: importing eekernels never fails because _C is missing, and the
ops compile with ninja on first use when it was not built at install time."""

import os
import subprocess
import sys
import textwrap

import pytest

HIDE_PREBUILT = "import sys; sys.modules['eekernels._C'] = None\n"  # makes `from . import _C` fail


def run_py(code, env_extra, timeout=600):
    env = dict(os.environ, **env_extra)
    return subprocess.run([sys.executable, "-c", HIDE_PREBUILT + textwrap.dedent(code)],
                          capture_output=True, text=True, env=env, timeout=timeout)


def test_import_without_extension_and_clear_error():
    r = run_py(
        """
        import torch, eekernels
        assert eekernels.available_backends()[0] == "torch"
        assert "cpu" not in eekernels.available_backends()
        print(eekernels.backend_report()["cpu"])
        try:
            eekernels.ops.exit_head(torch.randn(2, 3), torch.randn(2, 3), torch.randn(2), backend="cpu")
        except eekernels.BackendUnavailableError as e:
            print("ERR", e)
        out = eekernels.ops.exit_head(torch.randn(2, 3), torch.randn(2, 3), torch.randn(2))
        print("auto ->", out.logits.shape)
        """,
        {"EEKERNELS_NO_JIT": "1", "TRITON_INTERPRET": "0"},
    )
    assert r.returncode == 0, r.stderr
    assert "EEKERNELS_NO_JIT" in r.stdout
    assert "ERR backend 'cpu' is not available" in r.stdout
    assert "auto -> torch.Size([2, 2])" in r.stdout


@pytest.mark.slow
def test_jit_build_on_first_use(tmp_path):
    r = run_py(
        """
        import torch, eekernels
        from eekernels.ops import exit_head
        assert "cpu" in eekernels.available_backends(), eekernels.backend_report()
        h, w, b = torch.randn(5, 7), torch.randn(3, 7), torch.randn(3)
        a = exit_head(h, w, b, backend="cpu"); r = exit_head(h, w, b, backend="torch")
        assert torch.allclose(a.logits, r.logits, atol=1e-5)
        print("JIT OK")
        """,
        {"TORCH_EXTENSIONS_DIR": str(tmp_path), "EEKERNELS_JIT_CUDA": "0", "TRITON_INTERPRET": "0", "MAX_JOBS": "2"},
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "JIT OK" in r.stdout
    assert "compiling the C++ ops with ninja" in r.stderr
