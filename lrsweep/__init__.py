"""lrsweep: learning-rate range test and schedule sweep for LoRA fine-tuning."""

__version__ = "0.1.0"
