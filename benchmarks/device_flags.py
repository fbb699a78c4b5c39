"""The multi-device benchmarks' device flags: `--cpu-devices` (fake CPU devices, for a test run)
and `--decomposer` (XLA:GPU's ragged-all-to-all decomposer), which are XLA flags and so must be
set before jax is imported. No jax here."""

from __future__ import annotations

import argparse
import os


def add_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument("--decomposer", action="store_true",
                 help="XLA:GPU's ragged-all-to-all decomposer (the gradient-corruption fix)")
  p.add_argument("--cpu-devices", type=int, default=0, help="fake CPU devices (a test run)")


def apply(args: argparse.Namespace) -> None:
  """The flags `args` asks for, into the environment jax reads when it starts."""
  flags = os.environ.get("XLA_FLAGS", "")
  if args.cpu_devices:
    os.environ["JAX_PLATFORMS"] = "cpu"
    flags += f" --xla_force_host_platform_device_count={args.cpu_devices}"
  if args.decomposer:
    flags += " --xla_gpu_unsupported_enable_ragged_all_to_all_decomposer=true"
  os.environ["XLA_FLAGS"] = flags.strip()
