"""`optdsl build`: deterministic, fresh, atomic, isolated; the generated modules import and work."""
from __future__ import annotations

import ast
import difflib
import importlib
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import optdsl
from optdsl import build as build_mod, escape
from optdsl.backends.torch import interface
from optdsl.cli import main
from optdsl.pipeline import compile_source

ROOT = Path(__file__).resolve().parents[1]
SPECS = ROOT / "specs"
GENERATED = ROOT / "generated"
SPEC_FILES = sorted(SPECS.glob("*.opt"))
SPEC_IDS = [s.stem for s in SPEC_FILES]
HEADER = build_mod.HEADER


def listing(folder: Path) -> dict[str, bytes]:
    """Every plain file of a folder (no caches, no hidden files) with its bytes."""
    return {f.name: f.read_bytes() for f in sorted(folder.iterdir())
            if f.is_file() and not f.name.startswith(".")}


def stamps(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file's bytes and mtime."""
    return {f.name: (f.read_bytes(), f.stat().st_mtime_ns) for f in sorted(folder.iterdir())
            if f.is_file()}


def assert_same_folder(actual: Path, expected: Path, hint: str = ""):
    a, e = listing(actual), listing(expected)
    assert sorted(a) == sorted(e), f"different files: {sorted(a)} vs {sorted(e)}. {hint}"
    for name in e:
        if a[name] != e[name]:
            diff = "".join(difflib.unified_diff(
                e[name].decode().splitlines(True), a[name].decode().splitlines(True),
                f"{expected.name}/{name}", f"{actual.name}/{name}", n=2))
            pytest.fail(f"{name} differs. {hint}\n{diff[:4000]}")


@pytest.fixture(scope="module")
def fresh_build(tmp_path_factory):
    """specs/ built as the committed generated/ is: from the repository root, `optdsl build specs/`."""
    out = tmp_path_factory.mktemp("fresh") / "generated"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(ROOT)
        report = build_mod.build("specs/", out)
    assert report.ok, "\n".join(map(str, report.errors))
    return out


@pytest.fixture
def spec_copy(tmp_path):
    specs = tmp_path / "specs"
    shutil.copytree(SPECS, specs)
    return specs, tmp_path / "out"


# ---------------------------------------------------------------------------------------------
# determinism and freshness


def test_build_is_deterministic(fresh_build, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    second = tmp_path / "generated"
    assert build_mod.build("specs", second).ok
    assert_same_folder(second, fresh_build)
    # and building again into the same folder changes nothing
    before = stamps(second)
    report = build_mod.build("specs", second)
    assert report.ok and not report.written and not report.removed
    assert stamps(second) == before


def test_committed_generated_is_fresh(fresh_build):
    assert_same_folder(GENERATED, fresh_build,
                       "generated/ is stale: run `PYTHONPATH=. python cli.py build specs/` and commit it")
    assert {f.stem for f in GENERATED.glob("*.py")} == set(SPEC_IDS) | {"__init__"}


# ---------------------------------------------------------------------------------------------
# atomic and isolated

BROKEN_LINE = 12  # `m = lerp(m, g, 1 - b1)` in specs/adamw.opt's first rule


def test_broken_spec_harms_nothing(spec_copy, capsys):
    specs, out = spec_copy
    assert main(["build", str(specs), "-o", str(out)]) == 0
    capsys.readouterr()
    before = stamps(out)
    assert set(before) == {f"{s}.py" for s in SPEC_IDS} | {"__init__.py"}

    broken = specs / "adamw.opt"
    lines = broken.read_text().splitlines(keepends=True)
    assert lines[BROKEN_LINE - 1].strip() == "m = lerp(m, g, 1 - b1)"
    lines[BROKEN_LINE - 1] = "  m = lerp(m, g,, 1 - b1)\n"
    broken.write_text("".join(lines))

    rc = main(["build", str(specs), "-o", str(out)])
    err = capsys.readouterr().err
    assert rc != 0
    assert f"{broken.as_posix()}:{BROKEN_LINE}:" in err and "error" in err
    assert stamps(out) == before  # the broken spec's old output and every other one: same bytes, same mtime
    assert not [f for f in out.iterdir() if f.name.endswith(".tmp")]

    # another spec changed in the same build is rewritten; the rest stay untouched
    sgd = specs / "sgd.opt"
    sgd.write_text(sgd.read_text().replace("hyper lr = 1e-3", "hyper lr = 2e-3"))
    assert main(["build", str(specs), "-o", str(out)]) == 1
    capsys.readouterr()
    after = stamps(out)
    assert after["sgd.py"][0] != before["sgd.py"][0] and b"lr: float = 0.002" in after["sgd.py"][0]
    assert {k: v for k, v in after.items() if k != "sgd.py"} == {k: v for k, v in before.items() if k != "sgd.py"}

    # `check` reports the same error and fails too
    assert main(["check", str(specs)]) == 1
    assert f"{broken.as_posix()}:{BROKEN_LINE}:" in capsys.readouterr().err


def test_broken_spec_in_fresh_folder_writes_the_others(spec_copy, capsys):
    specs, out = spec_copy
    (specs / "lion.opt").write_text("optimizer Lion\nhyper lr = 1e-4 in [0, inf)\np -= lr * nope\n")
    assert main(["build", str(specs), "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert f"{(specs / 'lion.opt').as_posix()}:3:" in err
    assert not (out / "lion.py").exists()
    assert {f.stem for f in out.glob("*.py")} == set(SPEC_IDS) - {"lion"} | {"__init__"}


def test_deleted_spec_removes_its_module_only(spec_copy, capsys):
    specs, out = spec_copy
    assert main(["build", str(specs), "-o", str(out)]) == 0
    handwritten = out / "helpers.py"
    handwritten.write_text('"""Hand-written, not generated."""\nX = 1\n')
    notes = out / "notes.txt"
    notes.write_text(f"{HEADER} - but not a module\n")
    (specs / "sgd.opt").unlink()

    assert main(["build", str(specs), "-o", str(out)]) == 0
    capsys.readouterr()
    assert not (out / "sgd.py").exists()
    assert handwritten.read_text() == '"""Hand-written, not generated."""\nX = 1\n'
    assert notes.exists()
    assert '"sgd"' not in (out / "__init__.py").read_text()
    assert '"adamw"' in (out / "__init__.py").read_text()

    # a folder with no spec left is refused (a mistyped folder must not empty generated/): nothing changes
    for spec in specs.glob("*.opt"):
        spec.unlink()
    before = stamps(out)
    assert main(["build", str(specs), "-o", str(out)]) == 1
    assert "no .opt files in" in capsys.readouterr().err
    assert stamps(out) == before


# ---------------------------------------------------------------------------------------------
# the generated modules


def _class_name(spec: Path) -> str:
    return compile_source(spec.read_text(encoding="utf-8"), spec.as_posix()).program.name


def test_generated_package_imports():
    import generated
    import generated.adamw

    assert issubclass(generated.adamw.AdamW, torch.optim.Optimizer)
    assert sorted(generated.__all__) == sorted(SPEC_IDS)


@pytest.mark.parametrize("foreach", [False, True], ids=["single", "foreach"])
@pytest.mark.parametrize("spec", SPEC_FILES, ids=SPEC_IDS)
def test_load_matches_generated_module(spec, foreach):
    name = _class_name(spec)
    module = importlib.import_module(f"generated.{build_mod.module_name(spec)}")
    generated_cls = getattr(module, name)
    loaded_cls = optdsl.load(spec)
    assert issubclass(generated_cls, torch.optim.Optimizer) and issubclass(loaded_cls, torch.optim.Optimizer)
    assert generated_cls.__name__ == loaded_cls.__name__ == name

    gen = torch.Generator().manual_seed(0)
    shapes = ((4, 3), (6,))
    params = [torch.randn(s, generator=gen, dtype=torch.float64).requires_grad_() for s in shapes]
    copies = [p.detach().clone().requires_grad_() for p in params]
    a = generated_cls(params, foreach=foreach)
    b = loaded_cls(copies, foreach=foreach)
    for opt in (a, b):  # a spec that draws (kron's probes): each instance's generator is salted by how
        opt.manual_seed(0)  # many its class has made, and the two classes have made different numbers

    def closure_for(ps):
        def closure():
            return sum((p.detach() ** 2).sum() for p in ps)
        return closure

    for _ in range(6):
        grads = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
        for p, q, g in zip(params, copies, grads):
            p.grad, q.grad = g.clone(), g.clone()
        a.step(closure_for(params))
        b.step(closure_for(copies))
    for p, q in zip(params, copies):
        assert torch.isfinite(p).all()
        assert torch.equal(p, q)
        assert a.state[p].keys() == b.state[q].keys()
        for k in a.state[p]:
            assert torch.equal(a.state[p][k], b.state[q][k]), k


# ---------------------------------------------------------------------------------------------
# the command line


def test_cli_script_builds(tmp_path):
    out = tmp_path / "gen"
    proc = subprocess.run([sys.executable, "cli.py", "build", "specs/", "-o", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "0 failed" in proc.stdout
    assert_same_folder(out, GENERATED)


def test_cli_module_check():
    proc = subprocess.run([sys.executable, "-m", "optdsl.cli", "check", "specs/"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for spec in SPEC_IDS:
        assert f"specs/{spec}.opt:" in proc.stdout


# ---------------------------------------------------------------------------------------------
# what the generated source contains


def _statement_lines(text: str) -> list[str]:
    lines = []
    for line in text.splitlines():
        code = " ".join(line.split("#")[0].split())
        if code and not code.startswith(("optimizer ", "hyper ", "state ")):
            lines.append(code)
    return lines


@pytest.mark.parametrize("spec", SPEC_FILES, ids=SPEC_IDS)
def test_generated_source_is_documented_and_validates(spec, fresh_build):
    text = spec.read_text(encoding="utf-8")
    compiled = compile_source(text, f"specs/{spec.name}")
    source = compiled.python
    assert source == (fresh_build / f"{build_mod.module_name(spec)}.py").read_text(encoding="utf-8")
    assert source.startswith(HEADER)
    code = compile(source, spec.name, "exec")  # valid Python
    assert code is not None

    tree = ast.parse(source)
    module_doc = ast.get_docstring(tree)
    for line in text.splitlines():
        if line.strip():
            assert line.rstrip() in module_doc  # the whole spec, as written
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == compiled.program.name)
    class_doc = ast.get_docstring(cls)
    assert ".. math::" in class_doc and r"\leftarrow" in class_doc
    for stmt in _statement_lines(text):  # escaped as user text (the class docstring is raw: Kron's refusal's quotes show as \")
        assert f"``{escape.text(stmt)}``" in class_doc, stmt
    for k in compiled.program.keywords or compiled.program.hypers:  # torch.optim's keywords, where named
        assert re.search(rf"^\s*{k.name} \((float|bool|int|(?:None \| )?str|tuple\[[A-Za-z|, ]+\]), optional\)", class_doc, re.M), k.name
    # what the errors call each hyperparameter: its keyword, with its own name where that differs
    labels = {h.name: h.name for h in compiled.program.hypers} | {
        h.name: label for k in interface(compiled.program).get("keywords", []) for _, label, h in k.checks}

    # every bounded hyperparameter is validated, and a value just outside is refused by name
    assert "raise ValueError(" in source
    loaded = optdsl.compile(text, f"specs/{spec.name}")
    p = torch.zeros(2, requires_grad=True)
    for h in compiled.program.hypers:
        if h.lo > float("-inf"):
            assert h.only or f'raise ValueError(f"Invalid {labels[h.name].split()[0]} value:' in source
            bad = h.lo if not h.lo_closed else h.lo - 1
            with pytest.raises(ValueError, match=rf"\b{h.name}\b"):
                loaded([p], **{h.name: bad})
        if h.hi < float("inf"):
            bad = h.hi if not h.hi_closed else h.hi + 1
            with pytest.raises(ValueError, match=rf"\b{h.name}\b"):
                loaded([p], **{h.name: bad})
    loaded([p])  # the defaults are in range
