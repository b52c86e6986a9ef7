"""The Wan2.1 architectures (DiT, VAE, umT5 and its tokenizer, CLIP vision), their configs and presets, and the
layers they share (precision-aware linears, attention dispatch)."""
