"""The embedded toy model set: its recipe (`python -m training.toy.recipe`), the small VAE trainer and the
behaviour evaluation. Everything here trains or evaluates the real Wan2.1 classes at tiny sizes."""
