"""The README's five-minute walk-through works as written: scaffold, edit, load, train."""
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def _blocks(text, lang):
    """The contents of the fenced code blocks tagged `lang` ('' for untagged), in order."""
    blocks, current, tag = [], None, None
    for line in text.split("\n"):
        if line.startswith("```"):
            if current is None:
                current, tag = [], line[3:].strip()
            else:
                if tag == lang:
                    blocks.append("\n".join(current) + "\n")
                current = None
        elif current is not None:
            current.append(line)
    return blocks


def test_five_minute_walkthrough(tmp_path):
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Five minutes"):readme.index("## A spec")]
    (tmp_path / "specs").mkdir()
    done = subprocess.run([sys.executable, "-m", "optdsl.cli", "new", "MyAdamW", "--from", str(ROOT / "specs/adamw.opt"),
                           "-o", str(tmp_path / "specs")], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    spec = tmp_path / "specs" / "my_adam_w.opt"
    edit = _blocks(section, "")[0].strip()  # the cautious lines that replace AdamW's last one
    text = spec.read_text()
    last = "p -= lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)"
    assert text.count(last) == 1
    spec.write_text(text.replace(last, edit))
    code = section.split("<!-- quickstart: tests/test_readme.py runs this block -->")[1]
    code = _blocks(code, "python")[0].replace('"specs/my_adam_w.opt"', repr(str(spec)))
    scope = {}
    exec(compile(code, "README.md", "exec"), scope)
    model, x, y = scope["model"], scope["x"], scope["y"]
    start = torch.nn.functional.mse_loss(torch.zeros_like(y), y).item()
    assert scope["loss"].item() < 0.05 * start  # it trained
    assert type(scope["opt"]).__name__ == "MyAdamW"


def test_tour_links_every_spec():
    tour = (ROOT / "docs" / "tour.md").read_text()
    missing = [p.name for p in sorted((ROOT / "specs").glob("*.opt")) if f"(../specs/{p.name})" not in tour]
    assert not missing, f"docs/tour.md has no entry for {missing}"
