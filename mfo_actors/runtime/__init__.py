"""runtime layer (see ARCHITECTURE.md)."""
