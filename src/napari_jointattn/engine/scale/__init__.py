"""Scale-out: planning folder runs (``batch``), dask.distributed batches (``cluster``) and Zarr
images bigger than memory, block by block (``zarrseg``). Training under ``torchrun`` lives in
``training.distributed``."""
