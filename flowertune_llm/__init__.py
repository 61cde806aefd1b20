"""Federated instruction tuning of LLMs with LoRA/DoRA adapters on Flower."""
