"""Post-training: chat SFT data, verifiable tasks, linguistic units, RL losses, routing replay, and
the stages that use them (SFT, shortest-correct distillation, RL with verifiable rewards).

See docs/posttrain.md for the formats, the formulas and the training loops.
"""
