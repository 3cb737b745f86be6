"""Evaluation protocols of the experiments: statistics over seeds and methods."""
