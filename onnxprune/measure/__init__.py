"""Measurement: the MACs/params cost model (`cost`) and the ONNX Runtime latency benchmark
(`latency`), so a pruned model can be compared with the original on both ideal and real speed."""
