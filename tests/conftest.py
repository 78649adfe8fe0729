import os

# The fused Triton path runs on CPU tensors through Triton's interpreter, so CI checks the
# kernels without a GPU. On a GPU machine run with TRITON_INTERPRET=0 to compile them for real.
os.environ.setdefault("TRITON_INTERPRET", "1")
