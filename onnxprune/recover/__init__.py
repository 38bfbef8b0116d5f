"""Recover accuracy after pruning without the training code: distillation from the original.

`finetune` (in `recover.finetune`) imports torch; importing this package does not.
"""
