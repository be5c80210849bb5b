"""The subspace stage: out-of-core statistics and PCA (Dask) and attribute directions.

Reads only the store contract (pipeline.builder.store); writes `<OUT>/subspace/`, which
`w2w_core.WeightSpace.load(OUT)` reads without Dask.
"""
