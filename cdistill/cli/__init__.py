"""Command-line entry points (train, pipeline) and their TCAV report callback and loggers."""
