"""`with server:` for every local process the dev stack and the tests run."""

from __future__ import annotations

from types import TracebackType
from typing import Self


class StartsAndStops:
    """A local server used as a context manager: started on the way in, stopped on the way out."""

    def start(self) -> object:
        """Start the server and wait until it answers."""
        raise NotImplementedError

    def stop(self) -> None:
        """Stop the server; idempotent."""
        raise NotImplementedError

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
