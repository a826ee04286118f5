"""Training: loss functions, per-adapter AdamW, the records of forward_backward."""
