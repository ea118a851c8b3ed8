"""Generic search machinery: settings, search space, pruning, early stopping, tracking, the CLI."""
