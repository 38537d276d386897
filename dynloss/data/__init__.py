"""Dataset readers, the parquet shard format and its manifest (DESIGN.md section 5, "Shards").

    python -m pipelines.prepare digits --out /tmp/dl_digits
    python -c "from dynloss.data import read_manifest, read_split; print(read_split('/tmp/dl_digits', 'test').num_rows)"
"""

from dynloss.data.manifest import read_manifest
from dynloss.data.shards import SCHEMA, read_split, shard_paths
from dynloss.data.sources import SOURCES, Source, SplitData, load_source

__all__ = ["SCHEMA", "SOURCES", "Source", "SplitData", "load_source", "read_manifest", "read_split", "shard_paths"]
