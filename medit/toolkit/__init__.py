"""Helpers methods compose, written once: for locate-then-edit, covariance statistics, keys, target
vectors, multi-layer spreading, context templates, lifelong and norm-anchor options; for the other
families of editors, training and checkpoints, added neurons, attribution, embeddings, merging."""
