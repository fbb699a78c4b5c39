"""`python -m ling_jax.generate CKPT_OR_HF_DIR --prompt "..."` (cli.py)."""

import os
import sys

# The process owns the GPU: let JAX's pool take 95% of it rather than its default 75% (a
# Ling-2.6-flash with FP8 experts is 104.3 GiB of weights, more than 75% of an H200). An explicit
# XLA_PYTHON_CLIENT_MEM_FRACTION wins.
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")

from ling_jax.generate.cli import main  # noqa: E402

sys.exit(main())
