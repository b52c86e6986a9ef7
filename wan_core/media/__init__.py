"""Media: reading and writing images and videos, and the frame / latent tensor layouts of host applications."""
