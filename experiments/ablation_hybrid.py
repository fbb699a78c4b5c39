"""Ablation, arm 1 of 2: the hybrid layout, 7 Lightning layers + 1 MLA layer (Ling-2.6's 1:7).

    python -m experiments.ablation_hybrid      # then: python -m experiments.ablation_all_mla

Both arms share every number but `layer_group_size` (8 here, 1 there: with groups of one, every
layer is MLA), train on the same stdlib bytes in the same order, and report the eval loss in
runs/ablation_*/summary.json. The arms differ slightly in size (a Lightning layer and an MLA
layer do not have the same parameter count); each prints its count.
"""

import dataclasses
import sys

from experiments import tiny_pretrain
from experiments.overrides import main
from ling_jax.config import ling_tiny
from ling_jax.train import Experiment


def config(layer_group_size: int = 8, name: str = "hybrid") -> Experiment:
  base = tiny_pretrain.config()
  model = ling_tiny(num_hidden_layers=8, layer_group_size=layer_group_size)
  train = dataclasses.replace(base.train, out_dir=f"runs/ablation_{name}")
  return Experiment(model=model, data=base.data, train=train)


if __name__ == "__main__":
  main(config, sys.argv[1:])
