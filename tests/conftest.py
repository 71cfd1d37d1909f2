"""Test-session settings shared by every test file."""

import os

# The tests run tiny models (hidden 64), whose matmuls are too small to gain from several threads;
# on a busy machine OpenMP threads spin-wait for each other and a 30-step run measured 37 s with
# 2 threads against 1.9 s with one. Set before torch is imported, so subprocesses (torchrun, the
# killed training run) inherit it too. An OMP_NUM_THREADS set by the caller is kept.
os.environ.setdefault("OMP_NUM_THREADS", "1")
