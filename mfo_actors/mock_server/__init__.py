"""mock_server layer (see ARCHITECTURE.md)."""
