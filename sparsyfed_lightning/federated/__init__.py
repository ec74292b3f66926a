"""federated layer (see DESIGN.md)."""
