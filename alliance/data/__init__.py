"""A member's local data: CSV files, their schema, validation with exact errors, and a cache.

A member's data directory holds ``train.csv`` and optionally ``test.csv`` (either may be
gzipped: ``train.csv.gz``). The default schema is mnist-in-csv: a header
``label,1x1,1x2,...,28x28`` and one row per image (see ``docs/data-format.md``). Every problem
becomes a :class:`DataError` with a stable ``rule`` name, the file, the 1-based physical line
(the header is line 1) and the column (header name and 1-based index).

- ``errors``: :class:`DataError` and the rule names (:data:`RULES`);
- ``schema``: :class:`DataSchema`;
- ``csvfile``: reading a CSV file (plain or gzipped) and checking its header: the one way in,
  for the checks, training, prediction and splitting;
- ``parse``: the data lines into arrays, fast (pandas, numpy) and exact (the per-line rules);
- ``cache``: parsed arrays in memory and on disk, so a second load is almost free;
- ``datadir``: a member's data directory: find, load and validate its files;
- ``split``: a dataset split among members, IID or Dirichlet.

Nothing here imports TensorFlow, kopf or kubernetes.
"""

from alliance.data.cache import clear_memory_cache, default_cache_dir
from alliance.data.datadir import (
    SPLITS,
    Dataset,
    DataSummary,
    find_data_file,
    load_split,
    validate_data_dir,
)
from alliance.data.errors import RULES, DataError
from alliance.data.parse import read_features_csv
from alliance.data.schema import DataSchema
from alliance.data.split import split_dataset, split_labels

__all__ = [
    "RULES",
    "SPLITS",
    "DataError",
    "DataSchema",
    "DataSummary",
    "Dataset",
    "clear_memory_cache",
    "default_cache_dir",
    "find_data_file",
    "load_split",
    "read_features_csv",
    "split_dataset",
    "split_labels",
    "validate_data_dir",
]
