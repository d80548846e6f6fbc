"""What a request may cost and what it did cost: validation, bounds, body rewriting, usage
reading. Pure functions of bytes and documents: no I/O."""
