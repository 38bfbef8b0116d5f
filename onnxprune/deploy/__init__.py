"""After pruning: what a deployment needs (quantization)."""
