"""What a SessionManager asks of a session store, when one is configured
(service/store/durability.py).

Without hooks (the default `memory` store) sessions live and die with this process.
"""

from __future__ import annotations

from typing import Protocol

from service.sessions.state import Session


class SessionHooks(Protocol):
    async def missing(self, owner: str, session_id: str) -> Session | None:
        """A session not held here: bring it here from the store, or None if it is nowhere."""

    async def opened(self, session: Session) -> None:
        """A session was just opened here (its lock held); raising refuses it."""

    async def retired(self, session: Session, expired: bool) -> None:
        """A session was deleted or expired here: forget it in the store too."""

    def check_push(self, session: Session) -> None:
        """Before a new push is applied (its lock held): raising refuses it, changing nothing."""

    def pushed(self, session: Session) -> None:
        """A push was applied and is about to be acknowledged."""
