"""`optdsl plot`: valid PNG and SVG files, trajectories from the generated classes that descend,
loss curves that fall on the shipped task, and clear errors for what cannot be drawn."""
from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch

pytest.importorskip("matplotlib")

import optdsl  # noqa: E402
from optdsl import plot  # noqa: E402
from optdsl.cli import main  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SPECS = ROOT / "specs"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _spec(name: str) -> str:
    return str(SPECS / f"{name}.opt")


def test_png_of_trajectories_and_loss_curves(tmp_path, capsys):
    out = tmp_path / "pictures" / "both.png"
    rc = main(["plot", _spec("sgd"), _spec("adam"), "--function", "quadratic", "--task", "charlm",
               "--steps", "15", "-o", str(out)])
    assert rc == 0, capsys.readouterr().err
    assert capsys.readouterr().out == f"wrote {out.as_posix()}\n"
    data = out.read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    from matplotlib.image import imread

    image = imread(out)
    height, width = image.shape[:2]
    assert width > 1.8 * height > 300  # two panels side by side
    assert image[..., :3].std() > 0.05  # something is drawn, not a blank canvas


def test_svg_is_valid_and_the_same_bytes_every_time(tmp_path):
    a, b = tmp_path / "a.svg", tmp_path / "b.svg"
    for out in (a, b):
        assert main(["plot", _spec("adam"), _spec("lion"), "--function", "saddle", "--steps", "20",
                     "-o", str(out)]) == 0
    root = ET.parse(a).getroot()
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    text = a.read_text()
    assert "Adam (lr=0.02)" in text and "Lion (lr=0.02)" in text  # the legend, as text
    assert a.read_bytes() == b.read_bytes()


def _f(function, point) -> float:
    return float(function.f(point[0], point[1]))


@pytest.mark.parametrize("spec, hypers", [
    ("sgd", {"lr": 0.03}), ("sgd", {"lr": 0.01, "momentum": 0.9}), ("adam", {}), ("rmsprop", {}), ("lion", {}),
    ("adamw", {"lr": 0.1}), ("nsgda", {}),
])
def test_trajectories_descend_on_the_quadratic(spec, hypers):
    function = plot.FUNCTIONS["quadratic"]
    cls = optdsl.load(SPECS / f"{spec}.opt")
    path = plot.trajectory(cls, function, {"lr": function.lr} | hypers, 150)
    assert path.shape == (151, 2) and path.dtype == torch.float64
    assert torch.equal(path[0], torch.tensor(function.start, dtype=torch.float64))
    values = [_f(function, point) for point in path]
    assert values[-1] < 0.02 * values[0], values[::15]
    assert min(values[:10]) < values[0]  # it sets off downhill


def test_trajectory_is_the_generated_class_stepping(tmp_path):
    """The points are exactly what torch.optim.Adam visits from the same start."""
    function = plot.FUNCTIONS["rosenbrock"]
    path = plot.trajectory(optdsl.load(SPECS / "adam.opt"), function, {"lr": 0.05, "eps": 1e-3}, 40)
    p = torch.tensor(function.start, dtype=torch.float64, requires_grad=True)
    reference = torch.optim.Adam([p], lr=0.05, eps=1e-3)
    expected = [p.detach().clone()]
    for _ in range(40):
        reference.zero_grad()
        function.f(p[0], p[1]).backward()
        reference.step()
        expected.append(p.detach().clone())
    torch.testing.assert_close(path, torch.stack(expected), rtol=1e-12, atol=1e-14)


def test_divergence_stops_the_trajectory_and_is_labelled(tmp_path):
    function = plot.FUNCTIONS["rosenbrock"]
    path = plot.trajectory(optdsl.load(SPECS / "sgd.opt"), function, {"lr": 1.0}, 100)
    assert len(path) < 101 and not torch.isfinite(path[-1]).all()
    out = tmp_path / "diverged.svg"
    assert main(["plot", "--hyper", "lr=1", _spec("sgd"), "--steps", "100", "-o", str(out)]) == 0
    assert f"diverged at step {len(path) - 1}" in out.read_text()


def test_charlm_learns():
    train, heldout = plot._char_data()
    assert train.inputs.shape[1] == 4 and len(train.targets) > 8 * len(heldout.targets) > 0
    losses, heldout_losses = plot._charlm(optdsl.load(SPECS / "adam.opt"), {"lr": 3e-3}, 40)
    assert len(losses) == len(heldout_losses) == 40
    assert abs(losses[0] - math.log(train.vocab)) < 0.3  # it starts near a uniform guess
    assert losses[-1] < losses[0] - 0.8 and heldout_losses[-1] < heldout_losses[0] - 0.5
    again, _ = plot._charlm(optdsl.load(SPECS / "adam.opt"), {"lr": 3e-3}, 3)
    assert again == losses[:3]  # deterministic: a fixed seed, full batches


def test_hypers_go_to_the_specs_that_have_them():
    runs = plot.make_runs([_spec("sgd"), _spec("adam")], ["lr=0.5", "sgd.momentum=0.9", "Adam.eps=1e-6"])
    sgd, adam = runs
    assert sgd.given == {"lr": 0.5, "momentum": 0.9} and adam.given == {"lr": 0.5, "eps": 1e-6}
    assert sgd.hypers(0.01) == {"lr": 0.5, "momentum": 0.9}  # the command line beats the function's lr
    assert plot.make_runs([_spec("adam")], [])[0].hypers(0.01) == {"lr": 0.01}


@pytest.mark.parametrize("hypers, message", [
    (["momentum=0.9"], "Adam (specs/adam.opt) has no hyperparameter 'momentum'"),  # no plotted spec has it
    (["adam.momentum=0.9"], "has no hyperparameter 'momentum'; it has lr, "),
    (["lion.lr=0.1"], "no spec named 'lion' is plotted"),
    (["lr"], "--hyper expects NAME=NUMBER"),
    (["lr=fast"], "--hyper expects NAME=NUMBER"),
])
def test_bad_hypers_are_clear_errors(hypers, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    args = ["plot", "specs/adam.opt", *[a for h in hypers for a in ("--hyper", h)], "-o", str(tmp_path / "x.png")]
    assert main(args) == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_a_bad_spec_gives_the_usual_located_error(tmp_path, capsys):
    bad = tmp_path / "bad.opt"
    bad.write_text("optimizer Bad\nhyper lr = 0.1 in [0, inf)\np -= lr * sqrt(g, g)\n")
    assert main(["plot", str(bad), _spec("sgd"), "-o", str(tmp_path / "x.png")]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[0] == f"{bad}:3:11: error: sqrt() takes 1 argument, got 2"
    assert err[1:3] == ["    p -= lr * sqrt(g, g)", "              ^^^^^^^^^^"]
    assert err[3].startswith("  hint: ")
    assert not (tmp_path / "x.png").exists()


def test_unknown_function_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as done:
        main(["plot", _spec("sgd"), "--function", "himmelblau", "-o", str(tmp_path / "x.png")])
    assert done.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'himmelblau'" in err and "rosenbrock" in err and "quadratic" in err
    with pytest.raises(plot.PlotError, match="unknown function 'himmelblau': choose from rosenbrock, saddle, quadratic"):
        plot.plot([_spec("sgd")], tmp_path / "x.png", functions=["himmelblau"])


@pytest.mark.parametrize("args, message", [
    (["-o", "x.pdf"], "must end in .png or .svg"),
    (["-o", "x.png", "--steps", "0"], "--steps must be at least 1"),
    (["specs/no_such.opt", "-o", "x.png"], "no spec 'specs/no_such.opt'"),
])
def test_other_requests_that_cannot_be_drawn(args, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    if args[0] == "-o":
        args = [_spec("sgd"), *args]
    assert main(["plot", *args]) == 1
    assert message in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
