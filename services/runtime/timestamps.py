"""Wall-clock times on the wire: the services keep seconds since the Unix epoch (``time.time()``, what SQLite
stores), the contracts carry ``google.protobuf.Timestamp``."""
from __future__ import annotations

from google.protobuf import timestamp_pb2


def to_timestamp(seconds: float | None) -> timestamp_pb2.Timestamp | None:
    """``seconds`` since the Unix epoch as a Timestamp; None (the field stays unset) for None."""
    if seconds is None:
        return None
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(round(seconds * 1e9))
    return stamp
