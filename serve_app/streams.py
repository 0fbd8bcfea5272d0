"""Reading a stream of bytes whose length the other side decides, up to a limit.

Shared by the request body (a client's upload) and a remote feature API's answer: in
both the sender chooses how much comes, and the replica must stop holding it past a bound.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, Callable


async def read_at_most(
    chunks: AsyncIterable[bytes], limit: int, too_large: Callable[[], Exception]
) -> bytes:
    """The stream's bytes, or ``too_large()`` raised as soon as they pass ``limit``."""
    parts: list[bytes] = []
    size = 0
    async for chunk in chunks:
        size += len(chunk)
        if size > limit:
            raise too_large()
        parts.append(chunk)
    return b"".join(parts)
