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
