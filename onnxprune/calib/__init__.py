"""Calibration: activations, gradients and statistics used to score and correct pruned channels."""
