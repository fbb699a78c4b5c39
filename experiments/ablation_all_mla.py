"""Ablation, arm 2 of 2: every layer MLA (`layer_group_size=1`), otherwise as ablation_hybrid.

    python -m experiments.ablation_all_mla
"""

import sys

from experiments import ablation_hybrid
from experiments.overrides import main


def config():
  return ablation_hybrid.config(layer_group_size=1, name="all_mla")


if __name__ == "__main__":
  main(config, sys.argv[1:])
