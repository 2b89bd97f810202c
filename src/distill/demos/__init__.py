"""Built-in demos behind ``distill demo``: ``digits`` (classifier distillation) and ``lm`` (language models)."""
