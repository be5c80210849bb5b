"""pipeline: the distributed dataset builder and the subspace stage. Uses w2w_core."""
