"""Export sources: each turns one kind of model into an ``ExportedModel`` in a work directory."""
