"""Fraud detection on card/account transaction sequences: schema, adapters and a synthetic data generator."""
