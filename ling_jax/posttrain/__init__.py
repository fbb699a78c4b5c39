"""Post-training: chat SFT data, verifiable tasks, linguistic units, RL losses, routing replay data.

See docs/posttrain.md for the formats, the formulas and what the learner and generation sides must
provide.
"""
