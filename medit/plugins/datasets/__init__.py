"""medit plugins."""
