"""Fine-tuning: config schema, harmony data pipeline, LoRA, DeepSpeed trainer, EP, eval, merge."""
