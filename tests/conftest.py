"""Test-wide settings (CPU only, float32 matmuls at full precision) and a shared tiny tokenizer."""

import gc
import os
import shutil
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One on-disk compilation cache for the whole run, shared by both pytest-xdist workers and every
# child process a test starts (they inherit the environment): the CLI and multi-process tests, and
# tests that rebuild the same program after `jax.clear_caches()`, compile each program once. XLA's
# executables are keyed by the program and the compiler, so a hit is the same executable. Set
# JAX_COMPILATION_CACHE_DIR yourself to keep it between runs; by default it is fresh per run and
# removed at the end. The size cap switches on jax's file lock, so concurrent writers are safe.
_OWN_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _OWN_CACHE = tempfile.mkdtemp(prefix="samba_jax_tests_jit_cache_")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _OWN_CACHE
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
# A folder shared by the xdist workers for results that one of them computes for all (`computed_once`).
_OWN_SHARED = None
if "SAMBA_JAX_TEST_SHARED_DIR" not in os.environ:
    _OWN_SHARED = tempfile.mkdtemp(prefix="samba_jax_tests_shared_")
    os.environ["SAMBA_JAX_TEST_SHARED_DIR"] = _OWN_SHARED
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(8 << 30))
# The suite compiles thousands of small programs and runs each a few times: LLVM's optimisation
# passes were a third of XLA:CPU's compile time, and dropping them changes no float semantics (no
# fast-math either way). Child processes inherit it; tests that set XLA_FLAGS for a child append.
if "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()

import json  # noqa: E402

import filelock  # noqa: E402
import jax  # noqa: E402
import pytest  # noqa: E402

from samba_jax.data import tokenizer as tokenizer_lib  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


TINY_VOCAB = 512


def cpu_devices_env(count: int, **extra: str) -> dict:
    """The environment for a child process with `count` CPU devices (XLA reads the flag at start-up),
    keeping this run's XLA_FLAGS, compilation cache and the rest."""
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={count}".strip()
    return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=flags, **extra)


def computed_once(name: str, compute):
    """`compute()`'s JSON-able result, computed by whichever xdist worker asks first; the others wait
    for it and read it (a module fixture alone would run once per worker that gets its tests)."""
    path = os.path.join(os.environ["SAMBA_JAX_TEST_SHARED_DIR"], name + ".json")
    with filelock.FileLock(path + ".lock"):
        if not os.path.exists(path):
            result = compute()
            with open(path + ".tmp", "w") as f:
                json.dump(result, f)
            os.replace(path + ".tmp", path)
    with open(path) as f:
        return json.load(f)


def pytest_xdist_auto_num_workers(config):
    """`-n auto` (pytest.ini): one worker per core, at most 8, and one per 3 GB of memory."""
    try:
        memory_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    except (ValueError, OSError, AttributeError):
        memory_gb = 24.0
    return max(1, min(len(os.sched_getaffinity(0)), 8, int(memory_gb // 3)))


def pytest_unconfigure(config):
    if not hasattr(config, "workerinput"):  # the process that made them (not an xdist worker)
        for own in (_OWN_CACHE, _OWN_SHARED):
            if own:
                shutil.rmtree(own, ignore_errors=True)


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
