"""Hydra launcher ``hydra/launcher=dask`` (fedcore_adapter): a multirun's jobs as tasks on a Dask cluster."""
