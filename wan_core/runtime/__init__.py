"""Making a loaded model fit and run fast, as wrappers around it: fp8 weights, block swap and memory planning,
torch.compile, device identity, and the order they are applied in (`prepare`)."""
