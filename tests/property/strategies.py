"""Hypothesis strategies for every field of a request."""

from __future__ import annotations

from hypothesis import strategies as st

from spa.core.wire import Action, IPAddress, Request, check_address

service_names = st.from_regex(r"[a-z0-9][a-z0-9_-]{0,31}", fullmatch=True)
otps = st.one_of(st.just(""), st.from_regex(r"[0-9]{6,10}", fullmatch=True))


def _usable(address: IPAddress) -> bool:
    try:
        check_address(address)
    except ValueError:
        return False
    return True


addresses = st.one_of(
    st.none(),
    st.ip_addresses(v=4).filter(_usable),
    st.ip_addresses(v=6).filter(_usable),
)


@st.composite
def requests(draw: st.DrawFn) -> Request:
    action = draw(st.sampled_from(Action))
    duration = 0 if action is Action.CLOSE else draw(st.integers(0, 2**32 - 1))
    return Request(
        timestamp_ms=draw(st.integers(0, 2**64 - 1)),
        action=action,
        service=draw(service_names),
        duration=duration,
        address=draw(addresses),
        otp=draw(otps),
    )
