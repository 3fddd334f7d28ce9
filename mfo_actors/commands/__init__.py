"""commands layer (see ARCHITECTURE.md)."""
