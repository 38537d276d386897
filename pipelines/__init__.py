"""The Ray side of dynloss: data ingest, training, tuning, benchmarks, the ``dynloss`` command."""
from pipelines import gc_tuning

gc_tuning.for_startup()
