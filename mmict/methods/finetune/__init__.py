"""Vanilla fine-tuning: LoRA on the frozen MLLM's language model, no demonstrations (`module.py`).
"""
