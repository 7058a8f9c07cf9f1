"""Rule engine: YAML rules that dim streetlights and raise alerts (issue 4)."""
