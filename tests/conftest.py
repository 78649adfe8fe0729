import os

# The fused Triton path runs on CPU tensors through Triton's interpreter, so CI checks the
# kernels without a GPU. On a GPU machine run with TRITON_INTERPRET=0 to compile them for real.
os.environ.setdefault("TRITON_INTERPRET", "1")

# Hypothesis: the same examples on every run by default, so CI is reproducible; explore new ones
# with HYPOTHESIS_PROFILE=explore (a failure found there is saved in .hypothesis/ and replayed).
try:
    from hypothesis import settings

    settings.register_profile("ci", derandomize=True)
    settings.register_profile("explore", derandomize=False)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
except ImportError:
    pass


# Every module rendered while the tests run is audited against the allow-list of tests/codeaudit.py
# (the imports, names and calls optdsl's templates write): spec text that became code fails the test
# that compiled it, even where compile_source would have turned the failure into a SpecError.
import hashlib  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
import codeaudit  # noqa: E402
from optdsl.backends import torch as _torch_backend  # noqa: E402

@pytest.fixture
def float64_default():
    """float64 as torch's default dtype for the test: torch.optim keeps scalar states (step, NAdam's
    mu_product, ASGD's eta and mu) in the default dtype, so a float64 comparison with it is exact."""
    import torch
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


AUDITED: set[str] = set()  # digests of the distinct modules audited in this process
_FINDINGS: list[str] = []
_render = codeaudit.unaudited_render = _torch_backend.render


def _audited_render(*args, **kwargs):
    source = _render(*args, **kwargs)
    digest = hashlib.sha256(source.encode("utf-8", "surrogatepass")).hexdigest()
    if digest not in AUDITED:
        AUDITED.add(digest)
        problems = codeaudit.audit(source)
        if problems:
            _FINDINGS.append("\n".join(problems[:10]) + "\n--- module ---\n" + source[:3000])
    return source


_torch_backend.render = _audited_render


@pytest.fixture(autouse=True)
def _audit_generated_modules():
    yield
    if _FINDINGS:
        found = _FINDINGS.pop()
        _FINDINGS.clear()
        pytest.fail(f"a generated module fails the allow-list audit (tests/codeaudit.py):\n{found}")


def pytest_sessionfinish(session):
    log = os.environ.get("OPTDSL_AUDIT_LOG")  # how many modules the audit checked, for the record
    if log:
        with open(log, "a", encoding="utf-8") as f:
            f.write(f"{len(AUDITED)}\n")
