"""`pip install .` gives a working optdsl: the grammar and templates ship inside the wheel."""
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


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
    entry_points = zipfile.ZipFile(wheel).read("optdsl-0.1.0.dist-info/entry_points.txt").decode()
    assert "optdsl = optdsl.cli:main" in entry_points


def test_installed_wheel_compiles_and_builds_away_from_the_repo(wheel, tmp_path):
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site),
                    str(wheel)], check=True)
    specs = tmp_path / "specs"
    specs.mkdir()
    (specs / "sgd.opt").write_text("optimizer Plain\nhyper lr = 0.1 in [0, inf)\np -= lr * g\n")
    code = ("import sys, optdsl; assert optdsl.__file__.startswith(sys.argv[1]), optdsl.__file__;"
            "from optdsl.cli import main; sys.exit(main(['build', 'specs', '-o', 'out']))")
    done = subprocess.run([sys.executable, "-c", code, str(site)], cwd=tmp_path, capture_output=True, text=True,
                          env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    assert "class Plain(Optimizer)" in (tmp_path / "out" / "sgd.py").read_text()
