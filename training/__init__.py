"""Headless LoRA trainer for Wan2.1: `python -m training`. Imports only `wan_core`."""
