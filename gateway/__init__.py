"""Gateway: the operators' HTTP API and the built-in status page (issue 6)."""
