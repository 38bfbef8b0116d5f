"""Reference models (digits CNNs and an MLP) exported to ONNX for pruning tests."""
