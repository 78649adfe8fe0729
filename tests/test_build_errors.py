"""`optdsl build` and `check` when the files or folders are wrong: one line saying what happened
and what to do, exit 1, and every output that was there stays as it was (issue 12, item 7)."""
from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from optdsl import build as build_mod
from optdsl.cli import main

ROOT = Path(__file__).resolve().parents[1]
SPECS = ROOT / "specs"
SMALL = ["adam.opt", "sgd.opt", "lion.opt"]


def stamps(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file's bytes and mtime."""
    return {f.name: (f.read_bytes(), f.stat().st_mtime_ns) for f in sorted(folder.iterdir())
            if f.is_file()}


@pytest.fixture
def built(tmp_path):
    """Three specs, built once into out/: (specs folder, out folder, out's files before)."""
    specs = tmp_path / "specs"
    specs.mkdir()
    for name in SMALL:
        shutil.copy(SPECS / name, specs / name)
    out = tmp_path / "out"
    assert build_mod.build(specs, out).ok
    return specs, out, stamps(out)


def one_error_line(capsys, command: str) -> str:
    """stderr holds exactly one line, `optdsl COMMAND: error: ...; <what to do>`, and no traceback."""
    err = capsys.readouterr().err
    lines = err.strip().split("\n")
    assert len(lines) == 1, err
    assert lines[0].startswith(f"optdsl {command}: error: "), err
    assert "; " in lines[0] or ": give " in lines[0], err  # what happened; what to do
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize("command", ["build", "check"])
def test_a_missing_path_is_one_line(command, tmp_path, capsys):
    for missing in (tmp_path / "nope.opt", tmp_path / "nodir"):
        args = [command, str(missing)] + (["-o", str(tmp_path / "out")] if command == "build" else [])
        assert main(args) == 1
        line = one_error_line(capsys, command)
        assert missing.as_posix() in line and "give a .opt file" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["build", "check"])
def test_an_empty_folder_says_so_and_touches_nothing(command, built, tmp_path, capsys):
    _, out, before = built
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "README.md").write_text("not a spec\n")
    args = [command, str(empty)] + (["-o", str(out)] if command == "build" else [])
    assert main(args) == 1
    assert f"no .opt files in {empty.as_posix()}/" in one_error_line(capsys, command)
    assert stamps(out) == before  # generated modules are not removed as stale


def test_non_utf8_is_a_located_error_and_the_rest_builds(built, capsys):
    specs, out, before = built
    lines = (SPECS / "lion.opt").read_bytes().split(b"\n")
    lines.insert(2, "# the café's spec: ".encode() + b"caf\xe9")  # Latin-1 after UTF-8 text
    (specs / "lion.opt").write_bytes(b"\n".join(lines))
    line, column = 3, len("# the café's spec: caf") + 1
    (specs / "sgd.opt").write_text((SPECS / "sgd.opt").read_text().replace("hyper lr = 1e-3", "hyper lr = 2e-3"))
    assert main(["build", str(specs), "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"{(specs / 'lion.opt').as_posix()}:{line}:{column}: error: the file is not UTF-8 text"), err
    assert "hint: save the spec as UTF-8" in err and "Traceback" not in err
    after = stamps(out)
    assert after["lion.py"] == before["lion.py"]  # its old output stays
    assert after["sgd.py"] != before["sgd.py"]  # the others still build
    assert main(["check", str(specs / "lion.opt")]) == 1
    assert "not UTF-8" in capsys.readouterr().err


def test_a_byte_order_mark_is_fine(tmp_path, capsys):
    spec = tmp_path / "bom.opt"
    spec.write_bytes(b"\xef\xbb\xbf" + (SPECS / "sgd.opt").read_bytes())
    assert main(["check", str(spec)]) == 0


def test_output_that_is_a_file(built, tmp_path, capsys):
    specs, _, _ = built
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert main(["build", str(specs), "-o", str(afile)]) == 1
    assert "is a file, not a folder" in one_error_line(capsys, "build")
    assert afile.read_text() == "x"


def _changed(specs: Path) -> None:
    for name in SMALL:  # every module must be rewritten
        (specs / name).write_text((specs / name).read_text() + "# changed\n")


@pytest.mark.parametrize("failure", [errno.EACCES, errno.EROFS])
def test_a_read_only_output_folder(built, failure, monkeypatch, capsys):
    """The folder refuses new files (as a chmod 555 folder does for a non-root user)."""
    specs, out, before = built
    _changed(specs)

    def refuse(*args, **kwargs):
        raise OSError(failure, os.strerror(failure))
    monkeypatch.setattr(build_mod.tempfile, "mkstemp", refuse)
    assert main(["build", str(specs), "-o", str(out)]) == 1
    line = one_error_line(capsys, "build")
    assert os.strerror(failure) in line and "writable" in line and "-o" in line
    assert stamps(out) == before


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes into a chmod 555 folder")
def test_a_chmod_read_only_output_folder(built, capsys):
    specs, out, before = built
    _changed(specs)
    out.chmod(0o555)
    try:
        assert main(["build", str(specs), "-o", str(out)]) == 1
        assert "Permission denied" in one_error_line(capsys, "build")
    finally:
        out.chmod(0o755)
    assert stamps(out) == before


def test_a_full_disk_leaves_the_old_files_and_no_temp_file(built, monkeypatch, capsys):
    specs, out, before = built
    _changed(specs)
    real_fdopen = os.fdopen

    class Full:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, text):
            self.f.write(text[:10])  # a partial write, then the disk is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(build_mod.os, "fdopen", lambda fd, *a, **k: Full(real_fdopen(fd, *a, **k)))
    assert main(["build", str(specs), "-o", str(out)]) == 1
    line = one_error_line(capsys, "build")
    assert "No space left on device" in line and "free space" in line
    assert stamps(out) == before  # no partial module, no temp file


def test_a_second_build_at_once_is_refused(built, capsys):
    specs, out, before = built
    _changed(specs)
    with build_mod.locked(out):  # a build at work on out/
        assert main(["build", str(specs), "-o", str(out)]) == 1
        assert "another optdsl build is writing" in one_error_line(capsys, "build")
        assert stamps(out) == before
        proc = subprocess.run([sys.executable, "cli.py", "build", str(specs), "-o", str(out)], cwd=ROOT,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
        assert "another optdsl build is writing" in proc.stderr
    assert stamps(out) == before
    assert main(["build", str(specs), "-o", str(out)]) == 0  # once it is done, the next one runs
    assert stamps(out) != before
    # the lock is the folder's own (flock on its descriptor): nothing is left behind to ignore or delete
    assert sorted(f.name for f in out.iterdir() if f.name.startswith(".")) == []


def test_two_builds_at_once_leave_whole_modules(built):
    """Two processes start together: one builds, the other builds too or is refused; every module is whole."""
    specs, out, _ = built
    _changed(specs)
    procs = [subprocess.Popen([sys.executable, "cli.py", "build", str(specs), "-o", str(out)], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=120), p.stderr.read()) for p in procs]
    assert any(rc == 0 for rc, _ in results), results
    for rc, err in results:
        assert rc == 0 or "another optdsl build is writing" in err, err
    for name in SMALL:
        module = (out / name.replace(".opt", ".py")).read_text()
        assert module.endswith("# changed\n" + module.split("# changed\n")[-1]) and "# changed" in module
        compile(module, name, "exec")
    assert not [f for f in out.iterdir() if f.name.endswith(".tmp")]


# ---- what a cloned repository's specs/ and generated/ may hold (red-team, issue 12) ----
@pytest.mark.parametrize("command", ["build", "check"])
def test_a_link_out_of_the_specs_folder_is_not_read(built, command, capsys):
    """`specs/x.opt -> ~/.netrc` showed the secret's first line in the syntax error; a link to
    /dev/zero read without end. Specs found in a folder are read from inside it only; a link that
    stays inside is fine, and a file named on the command line is the user's to choose."""
    specs, out, before = built
    secret = specs.parent / "netrc"
    secret.write_text("machine example.com login bob password hunter2\n")
    (specs / "leak.opt").symlink_to(secret)
    (specs / "zero.opt").symlink_to("/dev/zero")
    (specs / "again.opt").symlink_to("adam.opt")
    args = [command, str(specs)] + (["-o", str(out)] if command == "build" else [])
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "hunter2" not in err and "Traceback" not in err
    assert f"{(specs / 'leak.opt').as_posix()} is a link to {secret.resolve().as_posix()}, outside" in err
    assert f"{(specs / 'zero.opt').as_posix()} is a link to /dev/zero, outside" in err
    assert "again.opt" not in err  # a link inside the folder builds
    if command == "build":
        assert (out / "again.py").is_file() and stamps(out)["adam.py"] == before["adam.py"]
    assert main(["check", str(specs / "leak.opt")]) == 1  # named: read, and it is no spec
    assert "syntax error" in capsys.readouterr().err


def test_no_device_fifo_or_huge_file_is_read_as_a_spec(tmp_path, capsys):
    fifo = tmp_path / "fifo.opt"
    os.mkfifo(fifo)
    huge = tmp_path / "huge.opt"
    huge.write_bytes(b"optimizer Huge\np -= g\n" + b"#" * build_mod.MAX_SPEC_BYTES)
    for path in (fifo, Path("/dev/zero"), huge):
        assert main(["check", str(path)]) == 1
        line = one_error_line(capsys, "check")
        assert "not a regular file" in line or "larger than 1 MiB" in line
        with pytest.raises(build_mod.BuildError):
            import optdsl
            optdsl.load(path)


def test_a_link_in_the_output_folder_is_neither_read_nor_removed(built, capsys):
    """A stale module is removed only when it is a regular file optdsl wrote; a link to /dev/zero in
    generated/ was read without end to see whether it was."""
    specs, out, before = built
    (out / "evil.py").symlink_to("/dev/zero")
    (out / "mine.py").symlink_to(out / "adam.py")
    assert main(["build", str(specs), "-o", str(out)]) == 0
    assert (out / "evil.py").is_symlink() and (out / "mine.py").is_symlink()


@pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")
def test_written_modules_get_the_mode_a_plain_write_gives(tmp_path):
    """A build's modules are readable as any file the user writes (0666 less the umask), and a
    rewritten module keeps its mode: the atomic write's temp file is 0600, which the rename kept."""
    specs, out = tmp_path / "specs", tmp_path / "out"
    specs.mkdir()
    shutil.copy(SPECS / "sgd.opt", specs / "sgd.opt")
    old = os.umask(0o027)
    try:
        assert build_mod.build(specs, out).ok
        assert {f.name: f.stat().st_mode & 0o777 for f in out.iterdir()} == {"sgd.py": 0o640, "__init__.py": 0o640}
        (out / "sgd.py").chmod(0o604)
        (specs / "sgd.opt").write_text((specs / "sgd.opt").read_text() + "# changed\n")
        assert build_mod.build(specs, out).written == [out / "sgd.py"]
        assert (out / "sgd.py").stat().st_mode & 0o777 == 0o604
    finally:
        os.umask(old)
