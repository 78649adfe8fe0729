"""The command line: --help with examples everywhere, colour only on a terminal, a progress bar only
on a terminal, and `optdsl new` scaffolds that compile, build and step."""
from __future__ import annotations

import importlib.util
import io
import os
import pty
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import optdsl
from optdsl import console
from optdsl.cli import main
from optdsl.errors import SpecError
from optdsl.pipeline import compile_source
from optdsl import escape
from optdsl.parse import parse
from optdsl.scaffold import TEMPLATE, class_name, snake_name

ROOT = Path(__file__).resolve().parents[1]
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
SUBCOMMANDS = ["build", "check", "explain", "equiv", "new", "plot"]
BAD = "optimizer Bad\nhyper lr = 1e-3 in [0, inf)\nstate m\nm = lerp(m, g, 0.1)\np -= lr * mm\n"


def _error_of(text: str, filename: str) -> str:
    with pytest.raises(SpecError) as info:
        compile_source(text, filename)
    return str(info.value)


def _run_tty(args: list[str], cwd: Path, **env: str) -> tuple[int, str]:
    """Run a command with stdout and stderr on a pseudo-terminal; what a person would see."""
    environ = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "FORCE_COLOR")}
    environ |= {"PYTHONPATH": str(ROOT), "TERM": "xterm", "COLUMNS": "120"} | env
    master, slave = pty.openpty()
    proc = subprocess.Popen(args, cwd=cwd, env=environ, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    return proc.wait(timeout=120), b"".join(chunks).decode().replace("\r\n", "\n")


# ---------------------------------------------------------------------------------------------
# help


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_every_subcommand_has_help_with_an_example(command, capsys):
    with pytest.raises(SystemExit) as done:
        main([command, "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: optdsl {command}")
    assert "example" in out
    examples = out[out.index("example"):]
    assert f"optdsl {command} " in examples  # an example of this command, not of another


def test_top_level_help_lists_every_subcommand_and_an_example(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for command in SUBCOMMANDS:
        assert re.search(rf"^\s+{command}\s+\S", out, re.MULTILINE), command
        assert f"optdsl {command} " in out[out.index("examples:"):], command


# ---------------------------------------------------------------------------------------------
# colour


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_errors_are_plain_text_when_piped(tmp_path, capsys):
    bad = tmp_path / "bad.opt"
    bad.write_text(BAD)
    assert main(["check", str(bad)]) == 1
    err = capsys.readouterr().err
    assert err == _error_of(BAD, str(bad)) + "\n"  # byte for byte the format tests/test_errors.py pins


@pytest.mark.parametrize("text", [
    BAD,  # a name error
    "optimizer Bad\np -= (g *\n",  # a syntax error, shown through the parser's context
    "optimizer Bad\nhyper lr = 2 in [0, 1]\np -= lr * g\n",  # a declaration error
])
def test_colour_paints_the_plain_text_and_keeps_the_caret_column(text, monkeypatch):
    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.setenv("TERM", "xterm")
    plain = _error_of(text, "bad.opt")
    screen = FakeTerminal()
    console.show(plain, screen)
    shown = screen.getvalue()
    assert "\x1b[" in shown
    assert ANSI.sub("", shown) == plain + "\n"  # the same characters in the same columns
    caret_line = next(line for line in shown.split("\n") if "^" in ANSI.sub("", line))
    assert re.search(r"\x1b\[[0-9;]*31m\^", caret_line), "the caret is red"
    assert re.search(r"\x1b\[[0-9;]*31merror", shown.split("\n")[0]), "'error' is red"


@pytest.mark.parametrize("env", [{"NO_COLOR": "1"}, {"TERM": "dumb"}])
def test_no_colour_on_request_even_on_a_terminal(env, monkeypatch):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    plain = _error_of(BAD, "bad.opt")
    screen = FakeTerminal()
    console.show(plain, screen)
    assert screen.getvalue() == plain + "\n"


def test_warnings_are_painted_too(monkeypatch):
    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.setenv("TERM", "xterm")
    warning = compile_source((ROOT / "specs" / "adalo.opt").read_text(), "specs/adalo.opt").warnings[0]
    screen = FakeTerminal()
    console.show(warning, screen)
    assert ANSI.sub("", screen.getvalue()) == str(warning) + "\n"
    assert re.search(r"\x1b\[[0-9;]*35mwarning", screen.getvalue())


def test_a_terminal_sees_colour_and_a_pipe_does_not(tmp_path):
    bad = tmp_path / "bad.opt"
    bad.write_text(BAD)
    plain = _error_of(BAD, str(bad))
    rc, screen = _run_tty([sys.executable, "-m", "optdsl.cli", "check", str(bad)], tmp_path)
    assert rc == 1 and "\x1b[" in screen
    assert ANSI.sub("", screen) == plain + "\n"
    rc, screen = _run_tty([sys.executable, "-m", "optdsl.cli", "check", str(bad)], tmp_path, NO_COLOR="1")
    assert rc == 1 and screen == plain + "\n"
    piped = subprocess.run([sys.executable, "-m", "optdsl.cli", "check", str(bad)], cwd=tmp_path,
                           capture_output=True, text=True, env=os.environ | {"PYTHONPATH": str(ROOT)})
    assert piped.returncode == 1 and piped.stderr == plain + "\n"


# ---------------------------------------------------------------------------------------------
# progress


@pytest.fixture
def three_specs(tmp_path):
    specs = tmp_path / "specs"
    specs.mkdir()
    for name in ("sgd", "lion", "adam"):
        shutil.copy(ROOT / "specs" / f"{name}.opt", specs)
    return specs


def test_build_shows_progress_on_a_terminal(three_specs, tmp_path):
    rc, screen = _run_tty([sys.executable, "-m", "optdsl.cli", "build", str(three_specs), "-o",
                           str(tmp_path / "out")], tmp_path)
    assert rc == 0, screen
    assert "building" in screen and "/3" in screen
    assert "adam.opt" in screen  # the spec being built is named
    assert screen.rstrip().endswith("4 written, 0 unchanged, 0 removed, 0 failed, 0 warnings")


def test_build_shows_no_progress_when_piped(three_specs, tmp_path):
    piped = subprocess.run([sys.executable, "-m", "optdsl.cli", "build", str(three_specs), "-o",
                            str(tmp_path / "out")], cwd=tmp_path, capture_output=True, text=True,
                           env=os.environ | {"PYTHONPATH": str(ROOT)})
    assert piped.returncode == 0
    assert piped.stderr == ""
    assert piped.stdout == "optdsl: 4 written, 0 unchanged, 0 removed, 0 failed, 0 warnings\n"


def test_progress_counts_and_names_items_on_a_terminal(monkeypatch):
    monkeypatch.setenv("TERM", "xterm")
    screen = FakeTerminal()
    with console.progress(3, "plotting", screen) as working_on:
        for name in ("SGD on saddle", "Adam on saddle", "Lion on saddle"):
            working_on(name)
    shown = ANSI.sub("", screen.getvalue())
    assert "plotting Lion on saddle" in shown and "2/3" in shown


def test_progress_is_silent_off_a_terminal():
    stream = io.StringIO()
    with console.progress(5, "working", stream) as working_on:
        for i in range(5):
            working_on(f"item {i}")
    assert stream.getvalue() == ""


# ---------------------------------------------------------------------------------------------
# optdsl new


@pytest.mark.parametrize("name, cls, snake", [
    ("MyAdam", "MyAdam", "my_adam"), ("my_adam", "MyAdam", "my_adam"), ("my-adam", "MyAdam", "my_adam"),
    ("AdamW", "AdamW", "adam_w"), ("SGDMomentum", "SGDMomentum", "sgd_momentum"), ("lion", "Lion", "lion"),
])
def test_names(name, cls, snake):
    assert (class_name(name), snake_name(name)) == (cls, snake)


def _load_module(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_new_scaffold_compiles_builds_and_steps_as_adamw(tmp_path, capsys):
    specs = tmp_path / "specs"
    assert main(["new", "MyAdam", "-o", str(specs)]) == 0
    path = specs / "my_adam.opt"
    assert f"wrote {path.as_posix()}" in capsys.readouterr().out
    text = path.read_text()
    assert "optimizer MyAdam" in text and text.count("#") >= 10  # commented
    assert main(["build", str(specs), "-o", str(tmp_path / "gen")]) == 0
    cls = _load_module(tmp_path / "gen" / "my_adam.py", "scaffold_my_adam").MyAdam
    assert issubclass(cls, torch.optim.Optimizer)

    # the template is Adam with decoupled weight decay: step it against torch.optim.AdamW
    gen = torch.Generator().manual_seed(0)
    shapes = [(1,), (7,), (13, 5), (3, 1, 4)]
    for lr, b1, b2, wd in [(1e-3, 0.9, 0.999, 0.0), (3e-2, 0.5, 0.9, 0.1)]:
        ours = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
        theirs = [p.clone() for p in ours]
        a = cls(ours, lr=lr, b1=b1, b2=b2, eps=1e-8, wd=wd)
        b = torch.optim.AdamW(theirs, lr=lr, betas=(b1, b2), eps=1e-8, weight_decay=wd)
        for _ in range(5):
            for p, q in zip(ours, theirs):
                p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float64)
                q.grad = p.grad.clone()
            a.step()
            b.step()
        for p, q in zip(ours, theirs):
            torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


def test_new_from_a_spec_renames_it_and_keeps_its_rule(tmp_path):
    assert main(["new", "my_lion", "--from", str(ROOT / "specs" / "lion.opt"), "-o", str(tmp_path)]) == 0
    text = (tmp_path / "my_lion.opt").read_text()
    original = (ROOT / "specs" / "lion.opt").read_text()
    assert "optimizer MyLion" in text and "optimizer Lion" not in text
    assert text.splitlines()[1:] == original.replace("optimizer Lion", "optimizer MyLion").splitlines()
    mine, lion = optdsl.load(tmp_path / "my_lion.opt"), optdsl.load(ROOT / "specs" / "lion.opt")
    assert mine.__name__ == "MyLion"
    gen = torch.Generator().manual_seed(1)
    p = torch.randn(13, 5, generator=gen, dtype=torch.float64)
    q = p.clone()
    a, b = mine([p], lr=0.01), lion([q], lr=0.01)
    for _ in range(4):
        p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float64)
        q.grad = p.grad.clone()
        a.step()
        b.step()
    assert torch.equal(p, q)


@pytest.mark.parametrize("odd", ["qq\nhyper zz = 1\n#", "qq\rqq", "qq\u2028qq"])
def test_new_writes_odd_paths_into_comments_escaped(odd, tmp_path):
    """Red-team (issue 12): the source's path and the output folder went into the new spec's comments
    as they were, so a newline in a file name started a line of spec text (here a hyperparameter
    above the header: refused as 'a spec starts with optimizer NAME')."""
    source = tmp_path / f"{odd}.opt"
    shutil.copy(ROOT / "specs" / "lion.opt", source)
    assert main(["new", "my_lion", "--from", str(source), "-o", str(tmp_path / "a")]) == 0
    assert main(["new", "mine", "-o", str(tmp_path / odd)]) == 0
    for written in (tmp_path / "a" / "my_lion.opt", tmp_path / odd / "mine.opt"):
        text = written.read_text()
        assert escape.text(odd) in text and odd not in text
        assert all(line.lstrip().startswith("#") for line in text.split("\n") if "qq" in line)
        assert [h.name for h in parse(text).hypers] == [h.name for h in parse(
            (ROOT / "specs" / "lion.opt").read_text() if "lion" in written.name else TEMPLATE.format(
            name="Mine", path="p", folder="f")).hypers]


def test_new_from_a_shipped_spec_by_name(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert main(["new", "Mine", "--from", "adamw", "-o", str(tmp_path)]) == 0
    assert "optimizer Mine " in (tmp_path / "mine.opt").read_text()
    assert optdsl.load(tmp_path / "mine.opt").__name__ == "Mine"


def test_new_never_overwrites(tmp_path, capsys):
    target = tmp_path / "my_adam.opt"
    target.write_text("# my own work\n")
    assert main(["new", "MyAdam", "-o", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert f"{target.as_posix()} already exists" in err and "choose another NAME" in err
    assert target.read_text() == "# my own work\n"


def test_new_reports_a_broken_source_where_it_is_broken(tmp_path, capsys):
    bad = tmp_path / "bad.opt"
    bad.write_text(BAD)
    assert main(["new", "Fixed", "--from", str(bad), "-o", str(tmp_path / "out")]) == 1
    assert capsys.readouterr().err == _error_of(BAD, bad.as_posix()) + "\n"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args, message", [
    (["9lives"], "not a usable optimizer name"),
    (["Mine", "--from", "no_such_spec"], "no spec 'no_such_spec'"),
])
def test_new_refuses_clearly(args, message, tmp_path, capsys):
    assert main(["new", *args, "-o", str(tmp_path)]) == 1
    assert message in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


HEAVY = ["torch", "sympy", "triton", "numpy", "lark", "jinja2", "rich", "matplotlib"]


@pytest.mark.parametrize("argv", [["--help"], ["--version"], ["explain", "--help"], ["new", "X", "-o", "{tmp}"]])
def test_a_command_that_needs_no_spec_compiled_imports_nothing_heavy(argv, tmp_path):
    """`optdsl --help` answers at once: torch, SymPy, Triton... are imported by the commands that use them."""
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    code = ("import sys\nfrom optdsl.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
            f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    if argv[0] == "new":  # the template is compiled: SymPy and Lark, never torch
        code = code.replace(repr(HEAVY), repr(["torch", "triton", "matplotlib"]))
    done = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, check=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_python_dash_m_optdsl_and_version():
    done = subprocess.run([sys.executable, "-m", "optdsl", "--version"], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert (done.returncode, done.stdout.strip()) == (0, f"optdsl {optdsl.__version__}")


def test_every_command_that_takes_a_spec_takes_a_name(tmp_path, monkeypatch, capsys):
    """A bare name is ./specs/NAME.opt if the user has one, else the spec optdsl ships."""
    monkeypatch.chdir(tmp_path)
    assert main(["check", "lion"]) == 0
    assert capsys.readouterr().out.startswith(f"{(ROOT / 'specs' / 'lion.opt').as_posix()}: ok")
    assert main(["info", "sm3", "--shape", "3x4"]) == 0
    assert "rule taken" in capsys.readouterr().out
    (tmp_path / "specs").mkdir()
    (tmp_path / "specs" / "lion.opt").write_text("optimizer MyLion\nhyper lr = 0.1 in [0, inf)\np -= lr * sign(g)\n")
    assert main(["check", "lion"]) == 0  # the user's own spec of that name comes first
    assert capsys.readouterr().out.startswith("specs/lion.opt: ok")
    for argv in (["check", "nope"], ["build", "nope"], ["explain", "nope"], ["info", "nope"]):
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert "no spec 'nope'" in err and "adamw" in err and "Traceback" not in err
    assert main(["equiv", "nope", "adam"]) == 3
    assert "no spec 'nope'" in capsys.readouterr().err


@pytest.mark.parametrize("shape, message", [
    ("99999999999999999999x99999999999999999999", "more than 2^63 elements"),  # red-team: a torch traceback
    ("4294967296x4294967296", "more than 2^63 elements"),
    ("\u09ea\u09ea", "sizes joined by 'x'"),  # int() reads Bengali 44
    ("4x", "sizes joined by 'x'"),
])
def test_info_refuses_a_shape_no_tensor_has_in_one_line(shape, message, capsys):
    assert main(["info", "adam", "--shape", shape]) == 1
    err = capsys.readouterr().err
    assert err.startswith("optdsl info: error: --shape") and message in err and "Traceback" not in err
