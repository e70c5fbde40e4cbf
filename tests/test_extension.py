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
        from eekernels import _extension
        torch.set_num_threads(2)
        assert _extension.load().parallel_for_threads() == 2  # built with OpenMP, as setup.py
        print("JIT OK")
        """,
        {"TORCH_EXTENSIONS_DIR": str(tmp_path), "EEKERNELS_JIT_CUDA": "0", "TRITON_INTERPRET": "0", "MAX_JOBS": "2"},
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "JIT OK" in r.stdout
    assert "compiling the C++ ops with ninja" in r.stderr


def test_cpu_kernels_loop_on_torch_threads():
    """The C++ kernels' row loops (at::parallel_for) use torch's threads: the library is built
    with OpenMP and shares torch's runtime, so torch.set_num_threads governs both."""
    import torch

    from eekernels import _extension

    ext = _extension.load()
    if ext is None:
        pytest.skip(f"no compiled extension: {_extension.load_error()}")
    before = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            assert ext.parallel_for_threads() == n
    finally:
        torch.set_num_threads(before)
    if os.path.exists("/proc/self/maps"):  # Linux
        with open("/proc/self/maps") as maps:
            gomp = {line.split()[-1] for line in maps if "libgomp" in line}
        assert len(gomp) <= 1, f"two OpenMP runtimes loaded: {sorted(gomp)}"


def test_python_schemas_match_the_cpp_ops():
    """The Triton custom ops reuse the op modules' schema strings: they must be the C++ ones."""
    import torch

    import eekernels
    from eekernels.ops.contracts.compaction import COMPACT_ROWS_SCHEMA, SCATTER_EXITS_SCHEMA
    from eekernels.ops.contracts.exit_head import EXIT_HEAD_SCHEMA
    from eekernels.ops.contracts.tokens import SCHEMAS

    if "cpu" not in eekernels.available_backends():
        pytest.skip("C++ extension unavailable")
    schemas = {"exit_head": EXIT_HEAD_SCHEMA, "compact_rows": COMPACT_ROWS_SCHEMA,
               "scatter_exits": SCATTER_EXITS_SCHEMA, **SCHEMAS}
    for name, schema in schemas.items():
        assert str(getattr(torch.ops.eekernels, name).default._schema) == f"eekernels::{name}{schema}"


def _import_graph(package_dir):
    """module -> the eekernels modules it imports, from every import statement in its file
    (inside functions too); ``from pkg import name`` counts as pkg.name when that is a module."""
    import ast
    from pathlib import Path

    root = Path(package_dir)
    files = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(root.parent).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {}
    for name, path in files.items():
        here = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = here
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                mod = ".".join(p for p in ((base if node.level else ""), node.module or "") if p)
                targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in files else mod for a in node.names]
            else:
                continue
            for t in targets:
                while t not in files and "." in t:
                    t = t.rpartition(".")[0]
                if t in files and t != name:
                    deps.add(t)
        graph[name] = deps
    return graph


def test_no_import_cycle_through_the_ops_layer():
    """DESIGN.md: no import circles. No module of the ops layer (ops, triton, backends, the
    extension loader) may reach itself through imports."""
    import eekernels

    graph = _import_graph(os.path.dirname(eekernels.__file__))
    owned = [m for m in graph if m.split(".")[1:2] in (["ops"], ["triton"], ["backends"], ["_extension"])]
    assert len(owned) >= 10, owned
    for start in owned:
        seen, todo = set(), list(graph[start])
        while todo:
            m = todo.pop()
            assert m != start, f"{start} imports itself through {sorted(seen)}"
            if m not in seen:
                seen.add(m)
                todo.extend(graph[m])
