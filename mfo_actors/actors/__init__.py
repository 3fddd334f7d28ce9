"""actors layer (see ARCHITECTURE.md)."""
