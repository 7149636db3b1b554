"""Many machines: the work split into shards (``sp_extract.shards``), shard stores folded into one
(``sp_extract.store.merge``) and runs driven on a Dask cluster (``dask``)."""
