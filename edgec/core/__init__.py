"""The floor of edgec (docs/architecture.md, layer 0): modules that import nothing else of edgec."""
