"""client layer (see ARCHITECTURE.md)."""
