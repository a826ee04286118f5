"""LoRA adapters: specs, weights, the multi-LoRA math and layers, PEFT read/write."""
