"""The upstream: which server serves a model, and the call that forwards an admitted request,
passes its answer through and settles it."""
