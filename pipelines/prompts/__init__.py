"""Prompts: the A1111 emphasis parser, the offline CLIP tokenizer, text encoding, LoRA and embeddings."""
