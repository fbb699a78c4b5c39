"""Test setup: 8 fake CPU devices for the sharding tests and XLA:CPU's quick compiles (both must
precede the first jax import), and the shared helpers (`testing`, `hf_fixtures`,
`numpy_reference`, `flop_count`) importable from every subfolder.

The folders mirror the tree: kernels/ (pallas_kernels), model/, io/, convert/, generate/, train/
(with data/ and experiments/), parallel/, posttrain/, docs/ (the notebooks).
"""

import gc
import os
import shutil
import sys
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "XLA_FLAGS" not in os.environ:
  os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
  if os.environ["JAX_PLATFORMS"] == "cpu":
    # Compiling is most of the suite's time and these programs are small: XLA:CPU's backend
    # (LLVM) optimisation off cuts the suite by about a fifth. GPU runs keep their defaults.
    os.environ["XLA_FLAGS"] += (" --xla_backend_optimization_level=0"
                                " --xla_llvm_disable_expensive_passes=true")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# One persistent compilation cache for the run: the xdist workers and every subprocess a test
# starts (CLIs, notebooks, multi-process runs inherit the environment) load a program that another
# process, or an earlier test's fresh `jax.jit` of the same function, already compiled. Removed
# when the run ends (`pytest_sessionfinish`). Set here in the process pytest started, whose
# environment the workers inherit; a cache set from outside is left alone.
_RUN_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _RUN_CACHE = os.path.join(tempfile.gettempdir(), f"ling_jax_tests_jax_cache_{os.getpid()}")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _RUN_CACHE
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

# Tracing leaves millions of short-lived objects and keeps large caches alive: at Python's default
# thresholds the collector ran 5,100 times and took 10.6 s of test_model + test_generate's 208 s
# (gc.callbacks), 4.2 s at these; over the whole suite (-n 2) the two workers spent 30 s and 28 s
# collecting at the defaults.
gc.set_threshold(50_000, 50, 1000)


def pytest_sessionfinish(session):
  if _RUN_CACHE is not None:  # the process that made it
    shutil.rmtree(_RUN_CACHE, ignore_errors=True)
