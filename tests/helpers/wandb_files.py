"""Reading an offline W&B run file without wandb's own reader (what a run logged, and whether it was closed)."""

from __future__ import annotations

import json
from pathlib import Path


def wandb_records(run_file: Path):
    """The records of an offline W&B run file, in order (wandb Record protobufs).

    The .wandb file is a LevelDB-style log: a 7-byte header, then 32 KiB blocks of records, each
    with a 7-byte header (crc32, little-endian length, kind: 1 full, 2 first, 3 middle, 4 last)
    and a chunk of a serialised wandb Record protobuf.
    """
    from wandb.proto import wandb_internal_pb2 as pb

    data = run_file.read_bytes()
    assert data[:4] == b":W&B", f"{run_file} is not a W&B run file"
    pos, block, payload = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        payload += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(payload)
            payload = b""
            yield record


def wandb_history(run_file: Path) -> dict:
    """Every history row's metrics in an offline W&B run file, merged (later rows win)."""
    history = {}
    for record in wandb_records(run_file):
        if record.WhichOneof("record_type") == "history":
            history.update({i.key or "/".join(i.nested_key): json.loads(i.value_json)
                            for i in record.history.item})
    return history


def wandb_config(run_file: Path) -> dict:
    """The run's config as the offline W&B run file holds it (later updates win)."""
    config = {}
    for record in wandb_records(run_file):
        if record.WhichOneof("record_type") == "config":
            config.update({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.config.update})
    return config


def wandb_finished(run_file: Path) -> bool:
    """Whether the run file ends with the run's exit record (the run was closed and flushed)."""
    kinds = [r.WhichOneof("record_type") for r in wandb_records(run_file)]
    return bool(kinds) and kinds[-1] == "exit"
