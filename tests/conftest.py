"""Test-wide settings (CPU only, float32 matmuls at full precision) and a shared tiny tokenizer."""

import gc
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

from samba_jax.data import tokenizer as tokenizer_lib  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


TINY_VOCAB = 512


@pytest.fixture(scope="module", autouse=True)
def _free_compiled_programs():
    """Drop every compiled program after each test module.

    XLA:CPU maps each compiled executable's code into its own memory regions. The whole
    suite in one process compiles thousands of programs; kept alive by jax's caches they
    pushed the mapping count past Linux's default limit (vm.max_map_count = 65530) near the
    end of the run, where the next compilation crashed the interpreter (SIGSEGV).
    """
    yield
    jax.clear_caches()
    gc.collect()


@pytest.fixture(scope="session")
def tiny_tokenizer_workdir(tmp_path_factory):
    """A workdir holding a 512-piece stdlib tokenizer trained on ~300K characters."""
    workdir = tmp_path_factory.mktemp("tokenizer_workdir")
    tokenizer_lib.train_default_tokenizer(
        str(workdir), TINY_VOCAB, max_training_chars=300_000
    )
    return workdir


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_tokenizer_workdir):
    return tokenizer_lib.Tokenizer(
        tokenizer_lib.default_tokenizer_path(str(tiny_tokenizer_workdir), TINY_VOCAB)
    )
