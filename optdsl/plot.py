"""`optdsl plot`: how specs move on 2-D test functions, and their loss curves on a tiny task.

Every curve comes from the optimizer class a spec compiles to (`optdsl.load`, the class users
get), run on CPU in float64 (functions) or float32 (the task) from fixed seeds, so a picture is
the same on every machine that has the same torch.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from . import load
from .build import no_such_spec, resolve_spec

if TYPE_CHECKING:  # torch is imported where it runs: `optdsl --help` should not wait for it
    from torch import Tensor


@dataclass(frozen=True)
class Function2D:
    """A test function of (x, y), where trajectories start, and what the picture shows of it."""

    formula: str
    f: Callable[[Tensor, Tensor], Tensor]
    start: tuple[float, float]
    minima: tuple[tuple[float, float], ...]
    xlim: tuple[float, float]
    ylim: tuple[float, float]
    lr: float  # for specs with an `lr`, unless --hyper says otherwise: the spec defaults crawl here


FUNCTIONS = {
    # the classic curved valley: easy to enter, slow to follow to (1, 1)
    "rosenbrock": Function2D("(1 - x)² + 100 (y - x²)²", lambda x, y: (1 - x) ** 2 + 100 * (y - x**2) ** 2,
                             start=(-1.5, 2.0), minima=((1.0, 1.0),), xlim=(-2.0, 2.0), ylim=(-1.0, 3.0),
                             lr=2e-2),
    # a saddle at the origin between two valleys: starting on the ridge, who leaves it first?
    "saddle": Function2D("x² - y²/2 + y⁴/4", lambda x, y: x**2 - y**2 / 2 + y**4 / 4,
                         start=(-1.5, 1e-3), minima=((0.0, 1.0), (0.0, -1.0)), xlim=(-2.0, 2.0),
                         ylim=(-1.6, 1.6), lr=2e-2),
    # condition number 25: plain gradient descent zig-zags across, adaptive methods rescale
    "quadratic": Function2D("(x² + 25 y²) / 2", lambda x, y: (x**2 + 25 * y**2) / 2,
                            start=(-2.5, 1.0), minima=((0.0, 0.0),), xlim=(-3.0, 1.0), ylim=(-1.5, 1.5),
                            lr=3e-2),
}


@dataclass(frozen=True)
class Task:
    """A small training problem: `run(cls, hypers, steps)` gives (train, held-out) loss per step."""

    title: str
    run: Callable[[type, dict, int], tuple[list[float], list[float]]]
    lr: float
    steps: int


@dataclass(frozen=True)
class CharData:
    inputs: Tensor   # (N, context) character ids
    targets: Tensor  # (N,) the character after each window
    vocab: int


def _char_data(context: int = 4) -> tuple[CharData, CharData]:
    """The opening of Alice's Adventures in Wonderland (Lewis Carroll, 1865; public domain)."""
    import torch
    text = resources.files("optdsl").joinpath("data/alice.txt").read_text(encoding="utf-8")
    text = " ".join(text.split())  # line breaks are layout, not language
    vocab = sorted(set(text))
    ids = torch.tensor([vocab.index(c) for c in text])
    windows = ids.unfold(0, context + 1, 1)
    cut = int(0.9 * len(windows))  # the last tenth of the text is never trained on
    split = (windows[:cut], windows[cut:])
    return tuple(CharData(w[:, :-1], w[:, -1], len(vocab)) for w in split)


def _charlm(cls: type, hypers: dict, steps: int) -> tuple[list[float], list[float]]:
    """A Bengio-style character MLP (4 characters of context), full batch: no sampling noise.

    Small on purpose: 3 KB of text overfits anything bigger within a hundred steps.
    """
    import torch
    train, heldout = _char_data()
    with torch.random.fork_rng(devices=[]):  # a fixed start, without touching the caller's RNG
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Embedding(train.vocab, 16), torch.nn.Flatten(),
                                    torch.nn.Linear(16 * train.inputs.shape[1], 64), torch.nn.Tanh(),
                                    torch.nn.Linear(64, train.vocab))
    opt = _optimizer(cls, model.parameters(), hypers)
    loss_fn = torch.nn.functional.cross_entropy
    train_losses, heldout_losses = [], []

    def closure():
        opt.zero_grad()
        loss = loss_fn(model(train.inputs), train.targets)
        loss.backward()
        return loss

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # matrices this small gain nothing from threads; on a busy machine they spin
    try:
        for _ in range(steps):
            train_losses.append(opt.step(closure).item())
            with torch.no_grad():
                heldout_losses.append(loss_fn(model(heldout.inputs), heldout.targets).item())
    finally:
        torch.set_num_threads(threads)
    return train_losses, heldout_losses


TASKS = {
    "charlm": Task("character-level MLP on Alice in Wonderland", _charlm, lr=3e-3, steps=120),
}


def _optimizer(cls: type, params, hypers: dict):
    """The optimizer of a plotted run; what it refuses by design (a value out of its range, a parameter
    that a `rule COND refuse` takes) is the plot's error, one line, not a traceback."""
    try:
        return cls(params, **hypers)
    except (ValueError, TypeError) as err:
        raise PlotError(str(err) if str(err).startswith(cls.__name__ + " ") else f"{cls.__name__}: {err}") from None


def trajectory(cls: type, function: Function2D, hypers: dict, steps: int) -> Tensor:
    """The points (x, y) an optimizer visits from the function's start: (steps + 1, 2), float64.

    Stops early at the first point that is not finite (the optimizer diverged).
    """
    import torch
    p = torch.tensor(function.start, dtype=torch.float64, requires_grad=True)
    opt = _optimizer(cls, [p], hypers)

    def closure():
        opt.zero_grad()
        loss = function.f(p[0], p[1])
        loss.backward()
        return loss

    points = [p.detach().clone()]
    for _ in range(steps):
        opt.step(closure)
        points.append(p.detach().clone())
        if not torch.isfinite(points[-1]).all():
            break
    return torch.stack(points)


# ---------------------------------------------------------------------------------------------
# which hyperparameters each spec runs with


class PlotError(Exception):
    """A request `optdsl plot` cannot draw; the message says what to do."""


@dataclass
class Run:
    """One spec to plot: its class, its label, and the hyperparameters given on the command line."""

    spec: Path
    cls: type
    given: dict[str, float] = field(default_factory=dict)

    @property
    def accepted(self) -> list[str]:
        """The constructor's hyperparameters (positional-or-keyword, as torch.optim's)."""
        params = inspect.signature(self.cls.__init__).parameters.values()
        return [q.name for q in params if q.kind is q.POSITIONAL_OR_KEYWORD and q.name not in ("self", "params")]

    def hypers(self, lr: float) -> dict[str, float]:
        """The problem's lr where the spec has one, then what the command line says."""
        return ({"lr": lr} if "lr" in self.accepted else {}) | self.given

    def label(self, lr: float) -> str:
        shown = ", ".join(f"{k}={v:g}" for k, v in self.hypers(lr).items())
        return f"{self.cls.__name__} ({shown})" if shown else self.cls.__name__


def parse_hypers(items: list[str]) -> list[tuple[str | None, str, float]]:
    """`lr=0.1` (every spec) and `sgd.momentum=0.9` (one spec, by file stem or class name)."""
    parsed = []
    for item in items:
        key, sep, value = item.partition("=")
        who, dot, name = key.strip().rpartition(".")
        try:
            number = float(value)
        except ValueError:
            number = math.nan
        if not sep or not name or (dot and not who) or math.isnan(number):
            raise PlotError(f"--hyper expects NAME=NUMBER or SPEC.NAME=NUMBER (e.g. lr=0.01, sgd.momentum=0.9), "
                            f"got {item!r}")
        parsed.append((who or None, name, number))
    return parsed


def make_runs(specs: list[str], hypers: list[str]) -> list[Run]:
    """Compile each spec (a SpecError names the file, line and column) and give it its --hyper values."""
    runs = []
    for spec in specs:
        path = resolve_spec(spec)
        if not path.is_file():
            raise PlotError(no_such_spec(spec))
        runs.append(Run(path, load(path)))
    for who, name, value in parse_hypers(hypers):
        chosen = [r for r in runs if who is None or who.lower() in (r.spec.stem.lower(), r.cls.__name__.lower())]
        if who is not None and not chosen:
            names = ", ".join(r.spec.stem for r in runs)
            raise PlotError(f"--hyper {who}.{name}: no spec named {who!r} is plotted (plotted: {names})")
        takers = [r for r in chosen if name in r.accepted]
        if not takers or (who is not None and len(takers) < len(chosen)):
            r = next(r for r in chosen if name not in r.accepted)
            raise PlotError(f"--hyper {name}: {r.cls.__name__} ({r.spec.as_posix()}) has no hyperparameter "
                            f"{name!r}; it has {', '.join(r.accepted)}")
        for r in takers:  # a global value goes to the specs that have it
            r.given[name] = value
    return runs


# ---------------------------------------------------------------------------------------------
# drawing


def _draw_function(ax, name: str, function: Function2D, runs: list[Run], steps: int, colours, working_on) -> None:
    import numpy as np
    import torch

    xs = torch.linspace(*function.xlim, 200, dtype=torch.float64)
    ys = torch.linspace(*function.ylim, 200, dtype=torch.float64)
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    z = function.f(grid_x, grid_y).numpy()
    z = z - z.min() + 1e-2  # log-spaced contours show both the valley floor and the walls
    ax.contour(xs.numpy(), ys.numpy(), z, levels=np.geomspace(z.min() * 1.5, z.max(), 18),
               colors="0.75", linewidths=0.6)
    for i, run in enumerate(runs):
        working_on(f"{run.cls.__name__} on {name}")
        path = trajectory(run.cls, function, run.hypers(function.lr), steps).numpy()
        label = run.label(function.lr)
        if not np.isfinite(path[-1]).all():
            label += f", diverged at step {len(path) - 1}"
            path = path[:-1]
        ax.plot(path[:, 0], path[:, 1], "-", color=colours[i], lw=1.4, label=label)
        ax.plot(path[-1, 0], path[-1, 1], "o", color=colours[i], ms=4)
    ax.plot(*function.start, "ks", ms=5)
    for m in function.minima:
        ax.plot(*m, "k*", ms=9)
    ax.set(xlim=function.xlim, ylim=function.ylim, xlabel="x", ylabel="y",
           title=f"{name}: {function.formula}, {steps} steps")
    ax.legend(loc="lower right", fontsize=7, framealpha=0.9)


def _draw_task(ax, name: str, task: Task, runs: list[Run], steps: int, colours, working_on) -> None:
    for i, run in enumerate(runs):
        working_on(f"{run.cls.__name__} on {name}")
        train, heldout = task.run(run.cls, run.hypers(task.lr), steps)
        ax.plot(range(1, len(train) + 1), train, "-", color=colours[i], lw=1.4,
                label=f"{run.label(task.lr)}: held-out {heldout[-1]:.2f}")
        ax.plot(range(1, len(heldout) + 1), heldout, "--", color=colours[i], lw=1)
    ax.set(xlabel="step", ylabel="cross-entropy (nats per character)",
           title=f"{name}: {task.title}\ntrain (solid) and held-out (dashed) loss")
    ax.legend(loc="upper right", fontsize=7, framealpha=0.9)


FORMATS = (".png", ".svg")


def plot(specs: list[str], out: str | Path, functions: list[str] = (), tasks: list[str] = (),
         steps: int | None = None, hypers: list[str] = (),
         working_on: Callable[[str], None] = lambda label: None) -> Path:
    """Draw one panel per function and per task into `out` (.png or .svg). Returns `out`."""
    try:
        from matplotlib import rc_context
        from matplotlib.figure import Figure  # no pyplot: no global figure state, no GUI backend
    except ImportError:
        raise PlotError("drawing needs matplotlib: pip install 'optdsl[plot]' (or matplotlib)") from None

    out = Path(out)
    if out.suffix.lower() not in FORMATS:
        raise PlotError(f"cannot write {out.as_posix()!r}: the output must end in .png or .svg")
    for name in functions:
        if name not in FUNCTIONS:
            raise PlotError(f"unknown function {name!r}: choose from {', '.join(FUNCTIONS)}")
    for name in tasks:
        if name not in TASKS:
            raise PlotError(f"unknown task {name!r}: choose from {', '.join(TASKS)}")
    if steps is not None and steps < 1:
        raise PlotError(f"--steps must be at least 1, got {steps}")
    if not (functions or tasks):
        functions = ["rosenbrock"]
    runs = make_runs(specs, list(hypers))

    panels = len(functions) + len(tasks)
    # svg.hashsalt fixes the ids matplotlib writes, so an SVG is the same bytes on every run
    with rc_context({"svg.hashsalt": "optdsl", "svg.fonttype": "none"}):
        fig = Figure(figsize=(5.6 * panels, 5.0), layout="constrained")
        axes = fig.subplots(1, panels, squeeze=False)[0]
        colours = [f"C{i % 10}" for i in range(len(runs))]
        for ax, name in zip(axes, functions):
            _draw_function(ax, name, FUNCTIONS[name], runs, steps or 200, colours, working_on)
        for ax, name in zip(axes[len(functions):], tasks):
            _draw_task(ax, name, TASKS[name], runs, steps or TASKS[name].steps, colours, working_on)
        out.parent.mkdir(parents=True, exist_ok=True)
        metadata = {"Date": None} if out.suffix.lower() == ".svg" else {"Software": None}
        fig.savefig(out, dpi=100, metadata=metadata)
    return out
