"""The engine: the op-level probe, its statistics, the replay of critic steps, losses and autocast policy."""
