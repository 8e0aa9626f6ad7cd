"""Request limits that both the edge (service/inputs.py, routes) and the SessionManager check."""

from __future__ import annotations

from service.errors import TooManyTimesteps


def check_timesteps(total: int, limit: int) -> None:
    """Refuse requests whose rows, summed over sequences, exceed max_timesteps_per_request."""
    if total > limit:
        raise TooManyTimesteps(
            f"the request has {total} timesteps; at most {limit} per request "
            "(max_timesteps_per_request): split it into several requests"
        )
