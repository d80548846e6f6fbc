"""One endpoint class per kind of route of the route table (routes.py); the hot path's order of
checks is handlers/inference.py."""
