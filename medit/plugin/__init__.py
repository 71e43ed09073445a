"""The plugin framework: pluggy hookspecs, the entry-point plugin manager and lazy registration
(metadata first, the implementing module imported on first use)."""
