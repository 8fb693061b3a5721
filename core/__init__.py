"""Shared model core: config, attention, MoE, model, training, compression and persistence."""
