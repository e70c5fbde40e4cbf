"""Training helpers reused from HF ``transformers``: losses, Trainer subclasses and callbacks."""
