"""daemon layer (see ARCHITECTURE.md)."""
