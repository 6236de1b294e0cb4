from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class PullRequest(_message.Message):
    __slots__ = ("repo", "revision", "start_layer", "end_layer", "whole", "mtp_from", "mtp_head")
    REPO_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    START_LAYER_FIELD_NUMBER: _ClassVar[int]
    END_LAYER_FIELD_NUMBER: _ClassVar[int]
    WHOLE_FIELD_NUMBER: _ClassVar[int]
    MTP_FROM_FIELD_NUMBER: _ClassVar[int]
    MTP_HEAD_FIELD_NUMBER: _ClassVar[int]
    repo: str
    revision: str
    start_layer: int
    end_layer: int
    whole: bool
    mtp_from: str
    mtp_head: bool
    def __init__(self, repo: _Optional[str] = ..., revision: _Optional[str] = ..., start_layer: _Optional[int] = ..., end_layer: _Optional[int] = ..., whole: _Optional[bool] = ..., mtp_from: _Optional[str] = ..., mtp_head: _Optional[bool] = ...) -> None: ...

class PullProgress(_message.Message):
    __slots__ = ("done_bytes", "total_bytes", "rate_bytes_per_s", "eta_s", "finished", "line", "snapshot", "fetched_bytes", "mtp_probe")
    DONE_BYTES_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    RATE_BYTES_PER_S_FIELD_NUMBER: _ClassVar[int]
    ETA_S_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    LINE_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    FETCHED_BYTES_FIELD_NUMBER: _ClassVar[int]
    MTP_PROBE_FIELD_NUMBER: _ClassVar[int]
    done_bytes: int
    total_bytes: int
    rate_bytes_per_s: float
    eta_s: float
    finished: bool
    line: str
    snapshot: str
    fetched_bytes: int
    mtp_probe: str
    def __init__(self, done_bytes: _Optional[int] = ..., total_bytes: _Optional[int] = ..., rate_bytes_per_s: _Optional[float] = ..., eta_s: _Optional[float] = ..., finished: _Optional[bool] = ..., line: _Optional[str] = ..., snapshot: _Optional[str] = ..., fetched_bytes: _Optional[int] = ..., mtp_probe: _Optional[str] = ...) -> None: ...
