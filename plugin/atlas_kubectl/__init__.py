"""`kubectl atlas`: a kubectl plugin for Atlas's keys and budgets (see cli.py and docs/kubectl-plugin.md)."""
