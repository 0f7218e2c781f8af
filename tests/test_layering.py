"""Layering: the phases are folders, and a phase imports only the phases before it (data flows one way);
the compiler's phases run without torch."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "mobilize"
# Lowest first. A module may import its own phase and those before it, never one after it.
PHASES = [
    "errors", "partials", "safe_io", "optional", "manifest", "frontend", "model", "quant", "targets", "package",
    "harness", "driver", "bench", "cli",
]  # fmt: skip
# torch is the reference runner's and the peers' (an optional extra), nobody else's.
TORCH_ALLOWED = ("harness/reference.py", "bench/")


def _phase(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "mobilize":
        return None
    return parts[1] if len(parts) > 1 else "errors"  # `mobilize` itself: the version, imported by anyone


def _imports(path: Path) -> list[str]:
    """Every module an import statement names, at any depth (lazy imports inside functions count)."""
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.append(node.module)
    return names


def _modules() -> list[Path]:
    return sorted(SRC.rglob("*.py"))


def test_every_module_is_in_a_phase():
    for path in _modules():
        rel = path.relative_to(SRC)
        phase = rel.parts[0].removesuffix(".py")
        assert phase in PHASES or rel.name == "__init__.py" and len(rel.parts) == 1, rel


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(SRC)))
def test_a_phase_never_imports_a_later_one(path):
    rel = path.relative_to(SRC)
    own = PHASES.index(rel.parts[0].removesuffix(".py")) if len(rel.parts) > 1 or rel.name != "__init__.py" else 0
    for module in _imports(path):
        phase = _phase(module)
        if phase is not None:
            assert phase in PHASES, f"{rel} imports {module}: no such phase"
            assert PHASES.index(phase) <= own, f"{rel} ({PHASES[own]}) imports {module} ({phase}), a later phase"


def test_only_the_reference_and_the_peers_import_torch():
    for path in _modules():
        rel = str(path.relative_to(SRC))
        if rel.startswith(TORCH_ALLOWED):
            continue
        assert not any(m.split(".")[0] == "torch" for m in _imports(path)), rel


def test_the_layering_test_can_fail(tmp_path):
    """The checks above see a lazy import inside a function, the way most cross-phase imports are written."""
    bad = tmp_path / "m.py"
    bad.write_text("def f():\n    from mobilize.harness.perf import measure\n")
    assert "mobilize.harness.perf" in _imports(bad)
    assert PHASES.index(_phase("mobilize.harness.perf")) > PHASES.index("frontend")


# Targets are plugins: outside a target's own folder (and the registry that names them, and the presets and suites
# that choose one as data) nothing compares a format's name.
FORMAT_FREE = ["driver.py", "cli.py", "package/", "harness/", "quant/", "model/", "frontend/", "manifest.py"]


@pytest.mark.parametrize("where", FORMAT_FREE)
def test_nothing_outside_the_targets_branches_on_a_format(where):
    from mobilize.targets.registry import TARGETS

    paths = [SRC / where] if where.endswith(".py") else sorted((SRC / where).rglob("*.py"))
    for path in paths:
        source = path.read_text()
        for name in TARGETS:
            assert f'"{name}"' not in source and f"'{name}'" not in source, (path.relative_to(SRC), name)


def test_every_registered_target_provides_both_sides():
    """A target's folder gives the export side (`target.py`) and the package side (`runtime.py`), loaded by name."""
    from mobilize.targets.registry import TARGETS, runtime, runtimes, target

    for name in TARGETS:
        t = target(name)
        assert t.name == name and isinstance(t.lazy_statistics, bool) and isinstance(t.activations_are, str)
        for method in ("check", "lower", "write", "finish", "readme", "weight_bytes", "activation_bytes"):
            assert callable(getattr(t, method)), (name, method)
        side = runtime(name)
        assert side.MODEL_FILES and side.CACHE_INPUTS and callable(side.check)
        first = next(iter(runtimes(name).values()))
        assert first.runner is not None, (name, "the default runtime has a runner (run, eval, greedy on a device)")
        for module in side.DEVICE_MODULES:
            assert (SRC / module).is_file(), module


def test_the_package_side_imports_no_compiler():
    """What a device runs (the runtime zip's modules) imports nothing of the compiler's phases at module level."""
    import io
    import zipfile

    from mobilize.harness.device import runtime_zip

    names = zipfile.ZipFile(io.BytesIO(runtime_zip())).namelist()
    for name in names:
        tree = ast.parse((SRC / name.removeprefix("mobilize/")).read_text())
        for node in tree.body:  # module level only: lazy imports run where their runtime is
            module = node.module if isinstance(node, ast.ImportFrom) else None
            if module and module.startswith("mobilize."):
                assert f"{module.replace('.', '/')}.py".removeprefix("mobilize/") in [n.removeprefix("mobilize/")
                                                                                      for n in names], (name, module)
