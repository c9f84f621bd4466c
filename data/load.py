"""One entry point for every supported input layout."""

from __future__ import annotations

from pathlib import Path

from data.generic import ColumnMapping, load_generic
from data.movielens import is_movielens_dir, load_movielens
from data.schema import LoadedData


def load_data(path: Path, mapping: ColumnMapping | Path | None = None) -> LoadedData:
    """Loads a MovieLens-100K folder or a generic log file.

    Args:
        path: a folder in the MovieLens-100K layout, or a Parquet/CSV log.
        mapping: for a log file, its column mapping (or a JSON/YAML file
            holding one); ignored for MovieLens folders.

    Raises:
        FileNotFoundError: nothing loadable at ``path``.
        ValueError: a log file without a mapping, or a mapping that does
            not fit it (``MappingError``, naming the mapping file).
    """
    path = Path(path)
    if path.is_dir():
        if is_movielens_dir(path):
            return load_movielens(path)
        raise FileNotFoundError(
            f"{path} is a folder without u.data, u.user and u.item; pass a "
            "MovieLens-100K folder, or a Parquet/CSV log file with --mapping"
        )
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    if mapping is None:
        raise ValueError(
            f"{path} is a log file: say which columns hold what in a mapping "
            "file (JSON or YAML with user, item, timestamp and rating or "
            "click), given as --mapping FILE, `mapping` in a --config, or the "
            "weekly DAG's mapping param"
        )
    if isinstance(mapping, ColumnMapping):
        return load_generic(path, mapping)
    return load_generic(path, ColumnMapping.from_file(mapping), mapping_file=mapping)
