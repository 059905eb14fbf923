"""qformer-lora: LoRA on the Q-Former of InstructBLIP / BLIP-2, with the failures pinned."""

__version__ = "0.1.0"
