"""Test setup: 8 fake CPU devices for the sharding tests (must precede the first jax import), and
the shared helpers (`testing`, `hf_fixtures`, `numpy_reference`, `flop_count`) importable from
every subfolder.

The folders mirror the tree: kernels/ (pallas_kernels), model/, io/, convert/, train/ (with data/
and experiments/), parallel/, posttrain/, docs/ (the notebooks).
"""

import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
