"""`python -m ling_jax.generate CKPT_OR_HF_DIR --prompt "..."` (cli.py)."""

import sys

from ling_jax.generate.cli import main

sys.exit(main())
