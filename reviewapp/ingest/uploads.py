"""The upload size limit, enforced while the request body streams in.

Django runs the multipart body through upload handlers before a view sees ``request.FILES``; a
Content-Length check alone misses chunked bodies and lying headers. This handler goes first in the
chain and stops reading the moment the file passes settings.MAX_UPLOAD_BYTES, so an oversized upload
costs at most the limit in disk and time. The view then answers 413.
"""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.files.uploadhandler import FileUploadHandler, StopUpload
from django.http import HttpRequest

FLAG = "ingest_upload_too_large"


class SizeLimitUploadHandler(FileUploadHandler):
    def __init__(self, request: HttpRequest | None = None, limit: int | None = None) -> None:
        super().__init__(request)
        self.limit = int(settings.MAX_UPLOAD_BYTES if limit is None else limit)
        self.received = 0

    def receive_data_chunk(self, raw_data: bytes, start: int) -> bytes:
        self.received += len(raw_data)
        if self.received > self.limit:
            setattr(self.request, FLAG, True)
            # connection_reset: do not read the rest of the body either.
            raise StopUpload(connection_reset=True)
        return raw_data

    def file_complete(self, file_size: int) -> Any:
        return None  # the next handler in the chain keeps the file


def guard(request: HttpRequest) -> None:
    """Install the limit on a request whose body has not been read yet."""
    request.upload_handlers.insert(0, SizeLimitUploadHandler(request))


def too_large(request: Any) -> bool:
    inner = getattr(request, "_request", request)  # a DRF Request wraps Django's
    return bool(getattr(inner, FLAG, False))
