"""Load shedding: a request's priority class, this process's in-flight count and the other
gateway processes' (load_view.py). Knows nothing of keys' limits."""
