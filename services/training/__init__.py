"""Training the default models from the procedural shapes data set (issue 17)."""
