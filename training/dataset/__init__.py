"""Datasets: the TOML schema, the items it yields (frame windows, buckets, why files are dropped) and the batches the
training loop reads from the caches."""
