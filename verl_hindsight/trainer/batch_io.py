"""The trainer's reads and writes of one training batch in TransferQueue.

verl's V1 trainer keeps a step's batch in TransferQueue and passes a ``KVBatchMeta`` (keys, partition, tags)
between stages; every stage reads the columns it needs and writes its outputs back. Per-token columns are stored
jagged (one row per sample, response-length), so a stage that computes on padded (bs, response_length) tensors
writes back through :func:`put_response_columns`.
"""

from __future__ import annotations

from typing import Any, Optional

import torch


def get(batch, fields: list[str], keys: Optional[list[str]] = None):
    """The ``fields`` of the batch's rows (of ``keys`` only, when given) as a TensorDict."""
    import transfer_queue as tq

    return tq.kv_batch_get(keys=batch.keys if keys is None else keys, partition_id=batch.partition_id,
                           select_fields=fields)


def put(batch, columns: dict[str, torch.Tensor]):
    """Write per-row ``columns`` (jagged or dense, batch-first) for every row of the batch; returns the batch."""
    import transfer_queue as tq
    from tensordict import TensorDict

    return tq.kv_batch_put(keys=batch.keys, partition_id=batch.partition_id,
                           fields=TensorDict(columns, batch_size=len(batch.keys)))


def put_response_columns(batch, columns: dict[str, torch.Tensor], response_mask):
    """Write padded (bs, response_length) ``columns`` back as jagged rows cut at each row's response length
    (``response_mask``: the batch's jagged response mask)."""
    from verl.workers.utils.padding import response_to_nested

    return put(batch, {name: response_to_nested(value, response_mask) for name, value in columns.items()})


def objects(data, name: str) -> list[Any]:
    """A non-tensor column (``extra_fields``, ``uid``) removed from ``data``, as a list."""
    value = data.pop(name)
    return value.tolist() if hasattr(value, "tolist") else list(value)


def rows(value) -> list:
    """A jagged or dense column as a list of 1-D tensors."""
    if hasattr(value, "unbind"):
        return list(value.unbind(0))
    return list(value)


def is_padding(batch) -> list[bool]:
    """The synthetic rows verl appends to make the batch divisible by the data-parallel size."""
    return [bool(tag.get("is_padding", False)) for tag in batch.tags]


def jagged(rows_: list, dtype: torch.dtype) -> torch.Tensor:
    """Rows of different lengths (lists or 1-D tensors) as one jagged tensor."""
    return torch.nested.as_nested_tensor([torch.as_tensor(r, dtype=dtype) for r in rows_], layout=torch.jagged)
