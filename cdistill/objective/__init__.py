"""Training objective: the concept, prototype and local loss terms and class prototypes."""
