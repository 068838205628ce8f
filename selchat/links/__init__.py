"""Links to other servers, each one more participant in the loop: RESP to Redis (resp, redis, scripts)."""
