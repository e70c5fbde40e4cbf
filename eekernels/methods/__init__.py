"""Early-exit methods, one module per method: its head, its loss and its exit rule."""
