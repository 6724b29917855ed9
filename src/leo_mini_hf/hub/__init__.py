"""Hub packaging: checkpoint folders with remote code, verified export with a model card, upload."""
