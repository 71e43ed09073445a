"""The model runtime: where a model comes from (:mod:`~medit.model.sources`: aliases, the hub, the
GGUF cache), loading by alias, hub id, folder or GGUF (:mod:`~medit.model.loading`) behind a
memory guard (:mod:`~medit.model.guards`), the :class:`~medit.model.handle.ModelHandle`, layer
resolution (``layers: auto``), forward-hook tracing and the adaptors methods swap modules with."""
