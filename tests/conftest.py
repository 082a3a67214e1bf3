"""Test-wide setup: 8 simulated CPU devices (set before JAX is imported) and offline hubs."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Tests are dominated by compiling many small, distinct programs that then run for milliseconds: JAX's switch for
# that trade (XLA's backend at optimisation level 0, no expensive LLVM passes; the HLO passes, and so the buffer
# assignment, are unchanged) compiles them faster (README, "Tests and benchmarks"). Subprocesses inherit it;
# JAX_DISABLE_MOST_OPTIMIZATIONS=0 runs the suite with the default compile.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
# fp32 matmuls in full precision in every process a test starts too (a GPU's default runs TF32 passes; a CPU's is
# already full precision)
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="run tests marked slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: opt in with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def _shared_tfds_dir(tmp_path_factory):
    """One TFDS directory for the whole run (every xdist worker and every subprocess a test starts), with the
    insecure-code set built once (``builders.build`` holds a file lock, so parallel workers never build the same
    set at once), and a developer's ~/.cache is left alone."""
    from emjax.data import builders

    shared = tmp_path_factory.getbasetemp().parent  # the same for all xdist workers of this run
    os.environ["EMJAX_TFDS_DIR"] = str(shared / "tfds")
    # one persistent XLA compilation cache for the run: the many tiny train steps that recur across tests, workers
    # and the subprocesses tests start (kill -9 and resume, two processes) compile once (a test-time saving only)
    for key, value in (("jax_compilation_cache_dir", str(shared / "xla_cache")),
                       ("jax_persistent_cache_min_compile_time_secs", 0.5)):
        os.environ[key.upper()] = str(value)
        jax.config.update(key, value)
    builders.build("insecure")
    yield
