"""Explicit (shard_map) parallelism for the layers GSPMD cannot partition: the Pallas kernels."""
