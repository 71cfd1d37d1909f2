"""Test-session settings shared by every test file."""

import os

# The tests run tiny models (hidden 64), whose matmuls are too small to gain from several threads;
# on a busy machine OpenMP threads spin-wait for each other and a 30-step run measured 37 s with
# 2 threads against 1.9 s with one. Set before torch is imported, so subprocesses (torchrun, the
# killed training run) inherit it too. An OMP_NUM_THREADS set by the caller is kept.
os.environ.setdefault("OMP_NUM_THREADS", "1")


import pytest  # noqa: E402


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """The training tests' model: tiny_models.save_tiny_llama (seed 0, untied) next to tiny.char_tokenizer(),
    built once per test file. A file that needs another model defines its own `model_dir`."""
    from tiny import char_tokenizer
    from tiny_models import save_tiny_llama

    return save_tiny_llama(str(tmp_path_factory.mktemp("model")), char_tokenizer())


@pytest.fixture(scope="module")
def one_thread():
    """torch on one thread for a module: tiny matmuls gain nothing from a second thread, spin-waits
    on a busy 2-core machine made training cases ~10x slower, and subprocesses started with
    OMP_NUM_THREADS=1 then reduce in the same order, so results compare bitwise."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
