"""taskflow layer (see ARCHITECTURE.md)."""
