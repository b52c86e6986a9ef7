"""Caches of encoded latents and text: the file store (names, metadata, checksums, cleanup) and the two cache
commands (`cache-latents`, `cache-text`)."""
