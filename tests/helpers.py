"""Small helpers shared by several test modules."""

from __future__ import annotations


def logical_operators(ds) -> list[str]:
    """Names of the operators in a Ray Dataset's logical plan, last first (e.g. which Parquet
    reader was planned: ``ReadParquet`` for V1, ``ListFiles`` + ``ReadFilesParquetV2`` for V2)."""
    names, stack = [], [ds._logical_plan.dag]
    while stack:
        op = stack.pop()
        names.append(op.name)
        stack.extend(op.input_dependencies)
    return names
