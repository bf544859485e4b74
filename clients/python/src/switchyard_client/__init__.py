"""Switchyard's Python client: typed sync and asyncio calls of the public gRPC API.

```python
from switchyard_client import Client

with Client("127.0.0.1:50051") as client:
    for chunk in client.generate("The capital of France is", max_tokens=8, temperature=0):
        print(chunk.text, end="", flush=True)
        if chunk.usage:
            print("\\n", chunk.finish_reason, chunk.usage)
```

`AsyncClient` is the same over asyncio. Errors are `switchyard_client.errors` exceptions; the raw
generated stubs are `switchyard_client.proto.generation_pb2` and `generation_pb2_grpc`.
"""

from ._client import DEFAULT_STREAM_TIMEOUT_S, DEFAULT_TIMEOUT_S, AsyncClient, Client
from .errors import (
    Cancelled, DeadlineExceeded, FailedPrecondition, Internal, InvalidArgument, NotFound, PermissionDenied,
    ResourceExhausted, SwitchyardError, Unauthenticated, Unavailable, Unimplemented,
)
from .types import ChatMessage, GenerateChunk, GenerateOptions, ModelInfo, RetryPolicy, Tls, TokenLogprob, Usage

__version__ = "0.1.0"

__all__ = [
    "Client", "AsyncClient", "DEFAULT_TIMEOUT_S", "DEFAULT_STREAM_TIMEOUT_S",
    "ChatMessage", "GenerateChunk", "GenerateOptions", "ModelInfo", "RetryPolicy", "Tls", "TokenLogprob", "Usage",
    "SwitchyardError", "InvalidArgument", "ResourceExhausted", "Unavailable", "DeadlineExceeded", "Unauthenticated",
    "PermissionDenied", "NotFound", "FailedPrecondition", "Cancelled", "Internal", "Unimplemented",
]
