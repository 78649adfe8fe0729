"""`pip install .` gives a working optdsl: the grammar, templates and specs ship inside the wheel,
and the installed command takes a shipped spec's name away from any checkout."""
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def site(wheel, tmp_path_factory) -> Path:
    site = tmp_path_factory.mktemp("site")
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site),
                    str(wheel)], check=True)
    return site


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(out)], check=True)
    return next(out.glob("optdsl-*.whl"))


def test_wheel_ships_grammar_and_templates(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert "optdsl/grammars/optdsl.lark" in names
    assert "optdsl/templates/torch_optimizer.py.j2" in names
    assert "optdsl/data/alice.txt" in names  # the text `optdsl plot --task charlm` trains on
    assert "optdsl/__main__.py" in names  # python -m optdsl
    shipped = {n.removeprefix("optdsl/specs/") for n in names if n.startswith("optdsl/specs/")}
    assert shipped == {p.name for p in (ROOT / "specs").glob("*.opt")}
    entry_points = zipfile.ZipFile(wheel).read("optdsl-0.1.0.dist-info/entry_points.txt").decode()
    assert "optdsl = optdsl.cli:main" in entry_points


def test_installed_wheel_compiles_and_builds_away_from_the_repo(site, tmp_path):
    specs = tmp_path / "specs"
    specs.mkdir()
    (specs / "sgd.opt").write_text("optimizer Plain\nhyper lr = 0.1 in [0, inf)\np -= lr * g\n")
    code = ("import sys, optdsl; assert optdsl.__file__.startswith(sys.argv[1]), optdsl.__file__;"
            "from optdsl.cli import main; sys.exit(main(['build', 'specs', '-o', 'out']))")
    done = subprocess.run([sys.executable, "-c", code, str(site)], cwd=tmp_path, capture_output=True, text=True,
                          env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    assert "class Plain(Optimizer)" in (tmp_path / "out" / "sgd.py").read_text()


def test_installed_command_takes_shipped_names_and_says_its_version(site, tmp_path):
    env = {"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin", "MPLBACKEND": "Agg"}
    for command in ([str(site / "bin" / "optdsl"), "--version"], [sys.executable, "-m", "optdsl", "--version"]):
        done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, env=env)
        assert (done.returncode, done.stdout.strip()) == (0, "optdsl 0.1.0"), done.stderr
    # one process for the commands that compile (each would import torch and SymPy again)
    code = ("import sys, optdsl; assert optdsl.__file__.startswith(sys.argv[1]), optdsl.__file__\n"
            "from optdsl.cli import main\n"
            "for argv in (['new', 'MyAdamW', '--from', 'adamw'], ['info', 'adafactor', '--shape', '8x8'],\n"
            "             ['check', 'lion'], ['plot', 'sgd', 'adamw', '--function', 'quadratic', '--steps', '3',\n"
            "              '-o', 'q.png'], ['check', 'adamx']):\n"
            "    print('exit', main(argv), flush=True)\n")
    done = subprocess.run([sys.executable, "-c", code, str(site)], cwd=tmp_path, capture_output=True, text=True,
                          env=env)
    assert done.returncode == 0, done.stderr
    assert [line for line in done.stdout.splitlines() if line.startswith("exit")] == ["exit 0"] * 4 + ["exit 1"]
    assert "optimizer MyAdamW" in (tmp_path / "specs" / "my_adam_w.opt").read_text()  # from the shipped adamw
    assert "hyper betas = (b1, b2)" in (tmp_path / "specs" / "my_adam_w.opt").read_text()
    assert "rule taken: ndim >= 2" in done.stdout and "optdsl/specs/lion.opt: ok" in done.stdout
    assert (tmp_path / "q.png").read_bytes().startswith(b"\x89PNG")
    assert "no spec 'adamx'" in done.stderr and "adamw" in done.stderr  # the names there are
