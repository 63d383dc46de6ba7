"""Datasets and data readers: the procedural shapes world (`smolvlm.data.shapes`) and friends."""
