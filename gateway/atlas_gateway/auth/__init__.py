"""Who is calling: the key presented -> its config (Principal, cached) -> whether it may be served
now; and which stored responses are its own. Knows nothing of limits, bodies or upstreams."""
